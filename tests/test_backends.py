"""Pretrained backends behind the model verbs, with tiny random checkpoints built and saved
locally and loaded through the same code path as a real one (hf:<folder>, clip:<folder>):
scores equal the Hugging Face classes'; whole collections run on each; missing weights and
pickled weights fail with a clear message; nothing is downloaded (HF_HUB_OFFLINE=1)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from vtfusion.catalogs.sources import read_csv
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import verify
from vtfusion.models import factory
from vtfusion.models.preprocess import fit, load_image, train_wordpiece
from vtfusion.search.engine import ItemQuery, SearchEngine
from vtfusion.search.evaluate import evaluate
from vtfusion.ui.cli import app

QUERY = "a large red checkered hat"


def _tokenizer(small_catalog):
    rows, _ = read_csv(small_catalog / "train.csv")
    return train_wordpiece([t for r in rows for t in r.texts], vocab_size=180, max_length=40)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory, small_catalog):
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    tok = _tokenizer(small_catalog)
    hf = tok.hf
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(hf), hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
            max_position_embeddings=48, pad_token_id=hf.pad_token_id, bos_token_id=hf.cls_token_id,
            eos_token_id=hf.sep_token_id, sep_token_id=hf.sep_token_id, encoder_hidden_size=20,
        ),
        vision_config=dict(hidden_size=20, intermediate_size=36, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        image_text_hidden_size=12,
    )
    out = tmp_path_factory.mktemp("blip")
    BlipForImageTextRetrieval(cfg).eval().save_pretrained(out)
    tok.save(out)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, small_catalog):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = _tokenizer(small_catalog)
    hf = tok.hf
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=48, pad_token_id=hf.pad_token_id, bos_token_id=hf.cls_token_id, eos_token_id=hf.sep_token_id,
        ),
        vision_config=dict(hidden_size=18, intermediate_size=30, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=10,
    )
    out = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(out)
    tok.save(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


TEXTS = ["a large red checkered hat", "two small blue bottles on the left", "a mug"]


# ---- the adapters equal the Hugging Face classes --------------------------------------------


def test_blip_adapter_matches_hf(blip_dir):
    from transformers import BlipForImageTextRetrieval

    ref = BlipForImageTextRetrieval.from_pretrained(str(blip_dir), use_safetensors=True).eval()
    b = factory.load(f"hf:{blip_dir}")
    assert (b.model.num_tokens, b.model.token_width, b.model.embed_dim) == (17, 20, 12)
    assert (b.transform.size, b.transform.mode, b.transform.resample) == (32, "squash", "bicubic")
    torch.manual_seed(2)
    px = torch.randn(3, 3, 32, 32)
    ids, mask = b.tokenizer(TEXTS)
    assert mask.sum(1).unique().numel() > 1  # padded: texts of different lengths
    with torch.no_grad():
        cos = ref(input_ids=ids, attention_mask=mask, pixel_values=px, use_itm_head=False).itm_score  # (3, 3)
        ours = b.model.encode_image(px) @ b.model.encode_text(ids, mask).T
        torch.testing.assert_close(ours, cos, atol=1e-5, rtol=1e-5)
        itm = ref(input_ids=ids, attention_mask=mask, pixel_values=px, use_itm_head=True).itm_score  # (3, 2)
        logits = b.model.itm_logits(b.model.image_tokens(px), ids, mask)
        torch.testing.assert_close(logits, itm[:, 1] - itm[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.sigmoid(logits), itm.softmax(-1)[:, 1], atol=1e-5, rtol=1e-5)
        # one image against three texts (the reranker's broadcast), with attention maps
        one, maps = b.model.itm_logits(b.model.image_tokens(px[:1]), ids, mask, return_attention=True)
        itm0 = ref(input_ids=ids, attention_mask=mask, pixel_values=px[:1].expand(3, -1, -1, -1), use_itm_head=True).itm_score
        torch.testing.assert_close(one, itm0[:, 1] - itm0[:, 0], atol=1e-5, rtol=1e-5)
        assert len(maps) == 2 and maps[0].shape == (3, 2, ids.shape[1], 17)


def test_clip_adapter_matches_hf(clip_dir):
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(str(clip_dir), use_safetensors=True).eval()
    b = factory.load(f"clip:{clip_dir}")
    assert not b.has_itm
    assert (b.model.num_tokens, b.model.token_width, b.model.embed_dim) == (17, 18, 10)
    assert (b.transform.size, b.transform.mode) == (32, "crop")
    torch.manual_seed(3)
    px = torch.randn(2, 3, 32, 32)
    ids, mask = b.tokenizer(TEXTS)
    with torch.no_grad():
        want_i = F.normalize(ref.get_image_features(pixel_values=px).pooler_output, dim=-1)
        want_t = F.normalize(ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        torch.testing.assert_close(b.model.encode_image(px), want_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.model.encode_text(ids, mask), want_t, atol=1e-5, rtol=1e-5)
        assert float(b.model.logit_scale_value()) == pytest.approx(float(ref.logit_scale.exp()))


def test_preprocessing_modes():
    from PIL import Image

    img = Image.new("RGB", (60, 30), "red")
    assert fit(img, 32, "squash").size == (32, 32)
    crop = fit(img, 32, "crop")
    assert crop.size == (32, 32) and crop.getpixel((0, 16)) == (255, 0, 0)  # no padding
    box = fit(img, 32, "letterbox")
    assert box.size == (32, 32) and box.getpixel((16, 0)) == (255, 255, 255)  # white padding
    with pytest.raises(ValueError, match="resize mode"):
        fit(img, 32, "stretch")


# ---- whole collections on each backend -----------------------------------------------------------


def _run_collection(folder, ref, small_catalog, tmp_path, token_dtype="auto", depths=(0, 4)):
    c = Collection.init(folder, ref, token_dtype=token_dtype)
    rep = ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    assert rep.added == 50 and rep.failed == 0
    assert verify(c).ok
    res = SearchEngine(c).search(QUERY, k=5, rerank_depth=8)
    report = evaluate(c, small_catalog / "test.csv", depths=depths, latency_queries=3, progress=False)
    return c, res, report


def test_blip_collection_end_to_end(blip_dir, small_catalog, tmp_path):
    c, res, report = _run_collection(tmp_path / "c", f"hf:{blip_dir}", small_catalog, tmp_path)
    assert c.config.model == f"hf:{blip_dir}" and c.config.token_dtype == "fp16"  # 17 x 20 x 2 B: small
    assert res.rerank_depth == 8 and all(h.itm is not None for h in res.hits)
    # the reranked scores are the adapter's own
    b = c.bundle
    hit = res.hits[0]
    ids, mask = b.tokenizer([QUERY])
    with torch.no_grad():
        tokens = b.model.image_tokens(b.transform.normalize(b.transform.batch([load_image(hit.image_path)])))
        want = float(b.model.itm_logits(tokens, ids, mask)[0])
    assert hit.itm_logit == pytest.approx(want, abs=2e-2)  # fp16 cache
    assert set(report.t2i) == {"itc", "rerank@4"} and set(report.i2t) == {"itc", "rerank@4"}
    # image -> text lookup by item, reranked with the query image's tokens
    res = SearchEngine(c).search(ItemQuery(1), target="text", k=3, rerank_depth=4)
    assert res.rerank_depth == 4 and len(res.hits) == 3 and all(h.itm is not None and h.item_id != 1 for h in res.hits)


def test_blip_without_token_cache_reencodes(blip_dir, small_catalog, tmp_path):
    c = Collection.init(tmp_path / "nc", f"hf:{blip_dir}", token_dtype="none")
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    assert c.tokens.record_bytes == 0 and not list((tmp_path / "nc" / "tokens").glob("shard-*"))
    rep = verify(c)
    assert rep.ok and any("disabled" in n for n in rep.notes)
    res = SearchEngine(c).search(QUERY, k=5, rerank_depth=8)
    assert res.cache_misses == 8 and all(h.itm is not None for h in res.hits)
    # same scores as a collection with an exact (fp32-equivalent) path: compute directly
    b = c.bundle
    ids = [h.item_id for h in res.hits]
    tokens, misses = c.item_tokens(ids)
    assert misses == len(ids)
    q_ids, q_mask = b.tokenizer([QUERY])
    with torch.no_grad():
        logits = b.model.itm_logits(tokens, q_ids, q_mask).numpy()
    assert [h.itm_logit for h in res.hits] == pytest.approx(logits.tolist(), abs=1e-5)


def test_clip_index_only_then_trained_fusion(clip_dir, small_catalog, tmp_path):
    c, res, report = _run_collection(tmp_path / "c", f"clip:{clip_dir}", small_catalog, tmp_path)
    assert res.rerank_depth == 0 and all(h.itm is None for h in res.hits)
    assert any("no trained ITM head" in n for n in res.notes)
    assert set(report.t2i) == {"itc"} and report.notes

    # train the native fusion layers on the frozen CLIP towers
    r = CliRunner().invoke(app, [
        "train", str(small_catalog / "train.csv"), "--out", str(tmp_path / "m"), "--init-from", f"clip:{clip_dir}",
        "--freeze-towers", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--checkpoint-every", "0",
    ])
    assert r.exit_code == 0, r.output
    trained = factory.load(tmp_path / "m")
    assert trained.has_itm and trained.config.vision.kind == "clip"
    index_only = factory.load(f"clip:{clip_dir}")
    for name, p in index_only.model.state_dict().items():  # frozen: towers, projections, temperature unchanged
        if not name.startswith(("fusion", "itm_head")):
            torch.testing.assert_close(trained.model.state_dict()[name], p, msg=name)
    assert any(not torch.equal(trained.model.state_dict()[n], p) for n, p in index_only.model.state_dict().items() if n.startswith("fusion"))
    c2, res2, report2 = _run_collection(tmp_path / "c2", tmp_path / "m", small_catalog, tmp_path)
    assert res2.rerank_depth == 8 and all(h.itm is not None for h in res2.hits)
    assert set(report2.t2i) == {"itc", "rerank@4"}
    # frozen CLIP towers: the ITC embeddings are CLIP's, so ITC-only results agree
    assert report2.t2i["itc"]["R@1"] == pytest.approx(report.t2i["itc"]["R@1"])


# ---- what goes wrong, said clearly ---------------------------------------------------------------


def test_missing_weights_error_names_the_reference(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(factory.ModelLoadError) as e:
        factory.load("hf:vtfusion-tests/no-such-blip")
    msg = str(e.value)
    for part in ("hf:vtfusion-tests/no-such-blip", "could not be found locally", "HF_HUB_OFFLINE",
                 "hf download vtfusion-tests/no-such-blip", "hf:DIR"):
        assert part in msg
    with pytest.raises(factory.ModelLoadError, match="no folder at"):
        factory.load("clip:./no/such/folder")
    r = CliRunner().invoke(app, ["init", "/tmp/vtf-never-created", "--model", "clip:vtfusion-tests/no-such-clip"])
    assert r.exit_code == 1 and "clip:vtfusion-tests/no-such-clip" in r.output and "could not be found locally" in r.output


def test_pickled_weights_are_refused(tmp_path, blip_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((blip_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(factory.ModelLoadError, match="never loads pickled"):
        factory.load(f"hf:{folder}")


def test_train_refuses_blip_init(blip_dir, small_catalog, tmp_path):
    r = CliRunner().invoke(app, ["train", str(small_catalog / "train.csv"), "--out", str(tmp_path / "m"), "--init-from", f"hf:{blip_dir}", "--epochs", "1"])
    assert r.exit_code == 1 and "BLIP checkpoints are used as they are" in r.output


def test_every_backend_implements_the_protocol(blip_dir, clip_dir, model_dir):
    """Native, CLIP-towered and BLIP models all carry every verb of ``Backend``; the one
    optional part, reusable text tokens, is None on BLIP and accepted back as None; one path
    from pixels gives the same (embedding, tokens) as the verbs one by one."""
    from PIL import Image

    from vtfusion.models import factory
    from vtfusion.models.backend import Backend

    img = Image.new("RGB", (40, 30), (200, 30, 30))
    for ref in (str(model_dir), f"clip:{clip_dir}", f"hf:{blip_dir}"):
        b = factory.load(ref)
        m = b.model
        assert isinstance(m, Backend), ref
        ids, mask = b.tokenizer(["a red mug"])
        with torch.no_grad():
            emb, tokens = b.embed_images([img])
            assert emb.shape == (1, m.embed_dim) and tokens.shape == (1, m.num_tokens, m.token_width)
            want = m.image_emb(m.image_tokens(b.transform.normalize(b.transform.batch([img]).to(b.device))))
            torch.testing.assert_close(emb, want)
            t_emb, t_tok = m.encode_text(ids, mask, return_tokens=True)
            assert t_emb.shape == (1, m.embed_dim)
            assert (t_tok is None) == (m.text_tokens(ids, mask) is None) == ref.startswith("hf:")
            a = m.itm_logits(tokens, ids, mask, text_tokens=t_tok)
            torch.testing.assert_close(a, m.itm_logits(tokens, ids, mask))
            assert float(m.logit_scale_value()) > 0
