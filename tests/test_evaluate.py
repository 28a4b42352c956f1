"""Evaluation metrics against hand-computed cases and BLIP's naive full-matrix itm_eval, and the
`vtfusion eval` report end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from vtfusion.search.evaluate import recall_at
from vtfusion.search.ranking import rank_direction


def test_recall_and_rerank_by_hand():
    assert recall_at([1, 2, 6, np.inf], ks=(1, 5, 10)) == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}
    # one text query over four images in ITC order 0..3 (scores 0.9..0.6); image 1 is relevant
    q = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0]], np.float32)
    itm = np.array([0.0, -5.0, 5.0, 9.0])
    first, _, _ = rank_direction(q, db, np.arange(4), np.array([1]), [0, 2, 4], "itm+itc", lambda qi, cand: itm[cand])
    # ITC: second. Depth 4, fused [0.9, -4.2, 5.7, 9.6]: order 3, 2, 0, 1 -> fourth. Depth 2:
    # only the first two are reordered ([0.9, -4.2] keeps 0 first): still second
    assert first == {0: [2], 2: [2], 4: [4]}
    first, _, _ = rank_direction(q, db, np.arange(4), np.array([1]), [4], "itm", lambda qi, cand: -itm[cand])
    assert first[4] == [1]  # -itm: [0, 5, -5, -9] puts image 1 first


def test_exact_ranks_mrr_and_ndcg_by_hand():
    """One image query over 14 captions in 3 groups; its two captions rank 2 and 13 by ITC (the
    second far past the candidate depth 4), with a tie broken by gallery position."""
    q = np.array([[1.0, 0.0]], np.float32)
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1], np.float32)
    db = np.stack([sims, np.zeros_like(sims)], axis=1)  # q @ db.T == sims
    groups = np.array([2, 0, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 0, 2])  # group 0: positions 1 and 12
    itm = np.array([-9.0, 9.0, 0.0, 0.0])  # depth 4 brings position 1 to the top
    first, ndcg, rr = rank_direction(q, db, groups, np.array([0]), [0, 4], "itm", lambda qi, cand: itm[: len(cand)])
    assert first == {0: [2], 4: [1]} and rr == {0: {"0": 0.5}, 4: {"0": 1.0}}
    idcg = 1 + 1 / np.log2(3)
    assert ndcg[0][0] == pytest.approx((1 / np.log2(3)) / idcg) and ndcg[4][0] == pytest.approx(1 / idcg)
    # the tie at 0.3 (positions 6, 7, 8): position 6 is ranked first of the three, at 7
    first, _, _ = rank_direction(q, db, groups, np.array([1]), [0], "itm", None)
    assert first[0] == [7]


def _blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's train_retrieval.itm_eval, verbatim in spirit: full matrices, argsort per row."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr, ir


@pytest.mark.parametrize("depth", [0, 16])
def test_streamed_ranks_equal_blip_full_matrix(depth):
    rng = np.random.default_rng(0)
    n_img, caps = 40, 3
    img = rng.normal(size=(n_img, 8)).astype(np.float32)
    txt2img = np.repeat(np.arange(n_img), caps)
    txt = (img[txt2img] + 1.2 * rng.normal(size=(len(txt2img), 8))).astype(np.float32)
    img2txt = [list(np.nonzero(txt2img == i)[0]) for i in range(n_img)]
    itm = rng.normal(size=(n_img, len(txt2img))).astype(np.float32) * 0.5  # a fixed "ITM" table
    sim = img @ txt.T  # (images, texts)

    # BLIP: ITC everywhere, plus ITM on each query's top-k (-100 elsewhere when reranked)
    s_i2t, s_t2i = sim.copy(), sim.T.copy()
    if depth:
        s_i2t = np.full_like(sim, -100.0)
        for i in range(n_img):
            top = np.argsort(-sim[i], kind="stable")[:depth]
            s_i2t[i, top] = itm[i, top] + sim[i, top]
        s_t2i = np.full_like(sim.T, -100.0)
        for t in range(len(txt2img)):
            top = np.argsort(-sim[:, t], kind="stable")[:depth]
            s_t2i[t, top] = itm[top, t] + sim[top, t]
    tr, ir = _blip_itm_eval(s_i2t, s_t2i, txt2img, img2txt)

    depths = [0, depth] if depth else [0]
    i2t_ranks, _, _ = rank_direction(img, txt, txt2img, np.arange(n_img), depths, "itm+itc",
                                     lambda qi, cand: itm[qi, cand], chunk=7)
    t2i_ranks, _, _ = rank_direction(txt, img, np.arange(n_img), txt2img, depths, "itm+itc",
                                     lambda qi, cand: itm[cand, qi], chunk=7)
    mine_tr = list(recall_at(i2t_ranks[depth]).values())
    mine_ir = list(recall_at(t2i_ranks[depth]).values())
    np.testing.assert_allclose(mine_tr, tr)
    np.testing.assert_allclose(mine_ir, ir)


def _oracle(sim, itm, groups, targets, depth, fusion="itm+itc"):
    """From the definitions, on full matrices: each query's full ranking (ITC order, ties by
    gallery position; the top ``depth`` reordered by the fused score, ties by ITC order), then
    R@K from the first relevant item, MRR, and nDCG@10 over every relevant item."""
    from vtfusion.search.rerank import fuse

    first, rr, ndcg = [], [], []
    for qi in range(sim.shape[0]):
        itc_order = sorted(range(sim.shape[1]), key=lambda j: (-sim[qi, j], j))
        head = itc_order[:depth]
        fused = fuse(sim[qi, head], itm[qi, head], fusion, 1.0)
        head = [head[i] for i in sorted(range(len(head)), key=lambda i: (-fused[i], i))]
        ranking = head + itc_order[depth:]
        rel_ranks = [pos + 1 for pos, j in enumerate(ranking) if groups[j] == targets[qi]]
        first.append(min(rel_ranks))
        rr.append(1 / min(rel_ranks))
        dcg = sum(1 / np.log2(r + 1) for r in rel_ranks if r <= 10)
        ndcg.append(dcg / sum(1 / np.log2(i + 2) for i in range(min(10, len(rel_ranks)))))
    return first, rr, ndcg, ranking


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_an_oracle_and_ir_measures_on_the_full_ranking(seed):
    """Random scores rounded to a few levels (heavy ties), several captions per image, positives
    far past every depth: R@K, MRR and nDCG@10 in both directions equal a from-the-definitions
    oracle and ir_measures run on the full rankings, to the last bit; ITC only is the same
    whatever depths are asked for."""
    import ir_measures
    from ir_measures import RR, Qrel, ScoredDoc, nDCG

    rng = np.random.default_rng(seed)
    n_img, caps, dim = 30, 3, 6
    img = np.round(rng.normal(size=(n_img, dim)), 0).astype(np.float32)  # integer vectors: many equal scores
    txt2img = np.repeat(np.arange(n_img), caps)
    txt = np.round(img[txt2img] * 0.3 + rng.normal(size=(len(txt2img), dim)), 0).astype(np.float32)
    itm = np.round(rng.normal(size=(n_img, len(txt2img))), 1).astype(np.float32)
    for q_emb, db_emb, groups, targets, table in (
        (img, txt, txt2img, np.arange(n_img), itm),  # image -> text: every caption relevant
        (txt, img, np.arange(n_img), txt2img, itm.T),  # text -> image
    ):
        sim = q_emb @ db_emb.T
        first_all, ndcg_all, rr_all = rank_direction(q_emb, db_emb, groups, targets, [0, 4, 16], "itm+itc",
                                                     lambda qi, cand: table[qi, cand], chunk=11)
        first_itc, _, _ = rank_direction(q_emb, db_emb, groups, targets, [0], "itm+itc", None, chunk=5)
        assert first_itc[0] == first_all[0]
        for depth in (0, 4, 16):
            first, rr, ndcg = [], [], []
            qrels, run = [], []
            for qi in range(len(q_emb)):
                f, r, n, ranking = _oracle(sim[qi : qi + 1], table[qi : qi + 1], groups, targets[qi : qi + 1], depth)
                first += f
                rr += r
                ndcg += n
                qrels += [Qrel(str(qi), str(j), 1) for j in np.flatnonzero(groups == targets[qi])]
                run += [ScoredDoc(str(qi), str(j), float(len(ranking) - pos)) for pos, j in enumerate(ranking)]
            assert first_all[depth] == first
            assert recall_at(first_all[depth]) == recall_at(first)
            assert [rr_all[depth][str(q)] for q in range(len(q_emb))] == rr
            assert max(abs(a - b) for a, b in zip(ndcg_all[depth], ndcg)) < 1e-12
            agg = ir_measures.calc_aggregate([RR, nDCG @ 10], qrels, run)
            assert abs(agg[RR] - np.mean(rr)) < 1e-12 and abs(agg[nDCG @ 10] - np.mean(ndcg_all[depth])) < 1e-12
        assert max(first_all[0]) > 16  # some positives lie past every depth


def _cli(*args, ok=True):
    from typer.testing import CliRunner

    from vtfusion.ui.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def _write_pairs(path, rows, base, text="caption"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for r in rows:
            w.writerow([base / r["image"] if not str(r["image"]).startswith("/") else r["image"], r[text]])
    return path


def _snapshot(col):
    """What an evaluation could change: every table's rows, every file of the collection but
    the database's own (which SQLite may rewrite without a change), and search results."""
    import hashlib
    import sqlite3

    con = sqlite3.connect(col / "catalog.db")
    tables = [t for (t,) in con.execute("select name from sqlite_master where type = 'table' order by name")]
    rows = {t: con.execute(f"select * from {t} order by 1").fetchall() for t in tables}
    con.close()
    files = {str(p.relative_to(col)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(col.rglob("*")) if p.is_file() and "catalog.db" not in p.name and not p.name.endswith(".lock")}
    hits = [json.loads(_cli("search", col, q, "--json", "--rerank-depth", "8").stdout) for q in ("a red mug", "a blue hat")]
    return rows, files, [[(h["item_id"], h["fused"]) for h in res["hits"]] for res in hits]


@pytest.fixture(scope="module")
def catalog_col(tmp_path_factory, model_dir, small_catalog):
    """A collection holding the small catalog's training split (the test split is not in it)."""
    col = tmp_path_factory.mktemp("evalcol") / "col"
    _cli("init", col, "--model", model_dir)
    _cli("ingest", col, small_catalog / "train.csv", "--workers", "0")
    return col


def test_eval_command_writes_the_report(tmp_path, catalog_col, small_catalog):
    """Report, markdown, plots, latency of searches on the collection, and TREC runs whose
    re-scoring by ir_measures gives the report's numbers."""
    import ir_measures
    from ir_measures import RR, Success, nDCG

    rows = list(csv.DictReader(open(small_catalog / "test.csv")))
    pairs = _write_pairs(tmp_path / "pairs.csv", rows + [{**r, "caption": r["title"]} for r in rows[:3]], small_catalog)
    out = tmp_path / "report"
    r = _cli("eval", catalog_col, pairs, "--depths", "0,4,8", "--out", out, "--latency-queries", "5", "--run-depth", "1000")
    rep = json.loads((out / "report.json").read_text())
    assert rep["images"] == len(rows) and rep["texts"] == len(rows) + 3 and rep["skipped"] == []
    assert rep["evaluated"] == {"t2i": len(rows) + 3, "i2t": len(rows)}
    for d in ("t2i", "i2t"):
        assert set(rep[d]) == {"itc", "rerank@4", "rerank@8"}
        assert {"R@1", "R@5", "R@10", "MRR", "nDCG@10"} <= set(rep[d]["itc"])
        m = rep[d]["rerank@4"]
        assert 0 <= m["p_value_vs_itc"] <= 1 and m["wins"] + m["ties"] + m["losses"] == rep["evaluated"][d]
        assert [(c["a"], c["b"]) for c in rep["comparisons"][d]] == [("rerank@4", "itc"), ("rerank@8", "itc"), ("rerank@8", "rerank@4")]
        for c in rep["comparisons"][d]:
            assert c["p_randomization_holm"] >= c["p_randomization"] and c["p_t_holm"] >= c["p_t"]
        # the TREC files re-scored by ir_measures: every stage, every number
        qrels = list(ir_measures.read_trec_qrels(str(out / "trec" / f"{d}.qrels")))
        for key in rep[d]:
            run = list(ir_measures.read_trec_run(str(out / "trec" / f"{d}.{key.replace('@', '')}.run")))
            agg = ir_measures.calc_aggregate([Success @ 1, Success @ 5, Success @ 10, RR, nDCG @ 10], qrels, run)
            assert [100 * agg[Success @ k] for k in (1, 5, 10)] == pytest.approx([rep[d][key][f"R@{k}"] for k in (1, 5, 10)], abs=1e-9)
            assert agg[RR] == pytest.approx(rep[d][key]["MRR"], abs=1e-12)
            assert agg[nDCG @ 10] == pytest.approx(rep[d][key]["nDCG@10"], abs=1e-12)
        assert rep["trec"]["first_relevant_beyond_run"][d] == {"itc": 0, "rerank@4": 0, "rerank@8": 0}
    for key in ("latency_ms", "latency_ms_i2t"):  # text -> image and image -> text searches, each timed per depth
        assert set(rep[key]) == {"itc", "rerank@4", "rerank@8"}
        assert {"encode", "retrieve", "rerank", "total"} <= set(rep[key]["rerank@8"])
        assert rep[key]["rerank@8"]["rerank"]["mean"] > rep[key]["itc"]["rerank"]["mean"]  # reranking really ran
    md = (out / "report.md").read_text()
    i2t_rows = md.split("## image → text")[1].splitlines()
    row8 = next(line for line in i2t_rows if line.startswith("| rerank@8 "))
    assert row8.split("|")[-2].strip() == f"{rep['latency_ms_i2t']['rerank@8']['total']['p95']:.1f}"
    assert md.startswith("# Reranking evaluation") and "randomization p" in md
    assert (out / "recall_vs_depth.png").stat().st_size > 1000 and (out / "latency_vs_depth.png").exists()
    assert "R@1" in r.output and "w/t/l" in r.output
    # recall only: no latency measured, no latency plot, no crash
    _cli("eval", catalog_col, pairs, "--depths", "0,4", "--out", tmp_path / "quick", "--latency-queries", "0")
    quick = json.loads((tmp_path / "quick" / "report.json").read_text())
    assert quick["latency_ms"] == quick["latency_ms_i2t"] == {}
    assert not (tmp_path / "quick" / "latency_vs_depth.png").exists()


def test_eval_evaluates_exactly_the_rows_and_never_writes_to_the_collection(tmp_path, catalog_col, small_catalog):
    """Pairs already stored under another source (with other texts), an identical copy under
    another name, a shrunk file, repeated captions, a Karpathy JSON after a CSV of the same
    images, bad rows and a file with nothing usable: the counts are the file's rows, and the
    collection's rows, files and search results are the same before and after."""
    before = _snapshot(catalog_col)
    train = list(csv.DictReader(open(small_catalog / "train.csv")))
    test = list(csv.DictReader(open(small_catalog / "test.csv")))

    def run(pairs, *extra, ok=True):
        out = tmp_path / f"out-{pairs.name}"
        r = _cli("eval", catalog_col, pairs, "--depths", "0,4", "--out", out, "--latency-queries", "0", *extra, ok=ok)
        return (json.loads((out / "report.json").read_text()) if ok else None), r

    stored, _ = run(_write_pairs(tmp_path / "stored.csv", train, small_catalog))  # ingested as "title | caption" from train.csv
    assert (stored["texts"], stored["images"], stored["reused_images"]) == (len(train), len(train), len(train))
    copy = tmp_path / "copy-under-another-name.csv"
    copy.write_bytes((tmp_path / "stored.csv").read_bytes())
    again, _ = run(copy)
    assert (again["t2i"], again["i2t"]) == (stored["t2i"], stored["i2t"])
    shrunk, _ = run(_write_pairs(tmp_path / "shrunk.csv", train[:10], small_catalog))
    assert (shrunk["texts"], shrunk["images"], shrunk["evaluated"]) == (10, 10, {"t2i": 10, "i2t": 10})
    dup, _ = run(_write_pairs(tmp_path / "dup.csv", train[:10] + train[:1], small_catalog))
    assert (dup["texts"], dup["images"], dup["evaluated"]["t2i"]) == (11, 10, 11)
    fresh, _ = run(_write_pairs(tmp_path / "fresh.csv", test, small_catalog))  # not in the collection: encoded for the run
    assert (fresh["texts"], fresh["reused_images"]) == (len(test), 0)
    # Karpathy JSON, two sentences per image, after the CSV of the same images
    kj = {"images": [{"filename": r["image"], "filepath": str(small_catalog), "split": "test",
                      "sentences": [{"raw": r["caption"]}, {"raw": r["title"]}]} for r in train[:32]]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(kj))
    karpathy, _ = run(tmp_path / "dataset_coco.json")
    assert (karpathy["images"], karpathy["texts"]) == (32, 64)
    # bad rows are listed with their line and reason; the rest is evaluated
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    bad_rows = [*train[:5], {"image": str(tmp_path / "gone.png"), "caption": "x"}, {"image": train[5]["image"], "caption": ""},
                {"image": str(tmp_path / "corrupt.png"), "caption": "a corrupt one"}]
    bad, r = run(_write_pairs(tmp_path / "bad.csv", bad_rows, small_catalog))
    assert bad["texts"] == 5 and [(x["line"], x["reason"].split(":")[0]) for x in bad["skipped"]] == [
        (7, "image file not found"), (8, "empty caption"), (9, bad["skipped"][2]["reason"].split(":")[0])]
    assert "corrupt.png" in bad["skipped"][2]["reason"] or "image" in bad["skipped"][2]["reason"]
    assert "skipped:" in r.output and ":7: image file not found" in r.output
    # nothing usable: an error, never NaN with success
    _, r = run(_write_pairs(tmp_path / "none.csv", bad_rows[5:], small_catalog), ok=False)
    assert r.exit_code != 0 and "none of its 3 rows can be evaluated" in r.output
    assert _snapshot(catalog_col) == before


def test_collection_gallery_equals_brute_force_over_active_items(tmp_path, model_dir, small_catalog):
    """--gallery collection: the training split as distractors plus the test split's items;
    ITC R@K and MRR in both directions equal a brute-force ranking of every active item
    (ties by id), deleted items never appear in a run, a deleted pair is listed as unmatched,
    --where restricts the gallery, and the collection is unchanged."""
    import hashlib

    import ir_measures

    from vtfusion.indexer.collection import Collection
    from vtfusion.search.evaluate import recall_at

    col = tmp_path / "col"
    _cli("init", col, "--model", model_dir)
    _cli("ingest", col, small_catalog / "train.csv", "--workers", "0")
    _cli("ingest", col, small_catalog / "test.csv", "--workers", "0")
    train = list(csv.DictReader(open(small_catalog / "train.csv")))
    test = list(csv.DictReader(open(small_catalog / "test.csv")))
    _cli("delete", col, "--ids", test[0]["id"], "--ids", train[0]["id"], "--ids", train[1]["id"], "--yes")
    pairs = _write_pairs(tmp_path / "pairs.csv", test, small_catalog)
    before = _snapshot(col)
    out = tmp_path / "out"
    r = _cli("eval", col, pairs, "--gallery", "collection", "--depths", "0,4", "--out", out, "--latency-queries", "2", "--run-depth", "1000")
    rep = json.loads((out / "report.json").read_text())
    assert [x["line"] for x in rep["skipped"]] == [2] and "ingest the pairs first" in rep["skipped"][0]["reason"]
    assert rep["texts"] == len(test) - 1 and rep["gallery_size"]["t2i"] == len(train) + len(test) - 3
    assert ":2: no active item" in r.output

    c = Collection.open(col)
    with c.Session() as s:
        from vtfusion.indexer.schema import Item

        items = s.query(Item.id, Item.image_path, Item.status, Item.external_id).order_by(Item.id).all()
        img_ids, img_vecs = c.stored_vectors(s, "image")
        txt_ids, txt_vecs = c.stored_vectors(s, "text")
    deleted = {i.id for i in items if i.status != "active"}
    sha = {i.id: hashlib.sha256(open(i.image_path, "rb").read()).hexdigest() for i in items}
    b = c.bundle
    import torch

    with torch.inference_mode():
        ids, mask = b.tokenizer([t["caption"] for t in test[1:]])
        q_txt = b.model.encode_text(ids, mask).float().numpy()

    def first_rank(scores, gallery_ids, rel):
        best = None
        for j in np.flatnonzero(np.isin(gallery_ids, rel)):
            rank = int((scores > scores[j]).sum() + (scores[:j] == scores[j]).sum()) + 1  # ties: lower id first
            best = rank if best is None else min(best, rank)
        return best

    t2i, i2t = [], []
    for n, t in enumerate(test[1:]):
        h = hashlib.sha256((small_catalog / t["image"]).read_bytes()).hexdigest()
        rel = [i for i in sha if sha[i] == h and i not in deleted]
        t2i.append(first_rank(img_vecs @ q_txt[n], img_ids, rel))
        qv = img_vecs[list(img_ids).index(rel[0])]
        i2t.append(first_rank(txt_vecs @ qv, txt_ids, rel))
    assert {k: v for k, v in rep["t2i"]["itc"].items() if k.startswith("R@")} == pytest.approx(recall_at(t2i), abs=1e-9)
    assert rep["t2i"]["itc"]["MRR"] == pytest.approx(np.mean(1 / np.array(t2i)), abs=1e-12)
    assert {k: v for k, v in rep["i2t"]["itc"].items() if k.startswith("R@")} == pytest.approx(recall_at(i2t), abs=1e-9)
    assert rep["i2t"]["itc"]["MRR"] == pytest.approx(np.mean(1 / np.array(i2t)), abs=1e-12)
    for run in (out / "trec").glob("*.run"):
        docs = {int(d.doc_id[4:]) for d in ir_measures.read_trec_run(str(run))}
        assert docs and not docs & deleted
    assert _snapshot(col) == before
    # --where: only the matching items form the gallery
    cat = test[1]["category"]
    rep = json.loads((_cli("eval", col, pairs, "--gallery", "collection", "--where", f"category = '{cat}'", "--depths", "0",
                           "--out", tmp_path / "w", "--latency-queries", "0") and (tmp_path / "w" / "report.json")).read_text())
    n_cat = sum(1 for r in train[2:] + test[1:] if r["category"] == cat)
    assert rep["gallery_size"]["t2i"] == n_cat and rep["texts"] == sum(1 for r in test[1:] if r["category"] == cat)
    _, r = None, _cli("eval", col, pairs, "--where", "category = 'mug'", ok=False)
    assert r.exit_code != 0 and "--gallery collection" in r.output


def test_blip_annotation_json_and_wrong_formats(tmp_path):
    from vtfusion.catalogs.pairs import read_pairs

    (tmp_path / "ann.json").write_text(json.dumps([
        {"image": "img/a.png", "caption": ["a red mug", "a mug, red"], "image_id": "a"},
        {"image": "img/b.png", "caption": "a blue hat"},
    ]))
    pairs = read_pairs(tmp_path / "ann.json")
    assert [(p.image.name, p.caption, p.line) for p in pairs] == [("a.png", "a red mug", 1), ("a.png", "a mug, red", 1), ("b.png", "a blue hat", 2)]
    for bad in ('{"annotations": []}', '[{"file": "x.png", "text": "y"}]', "[1, 2]", "{not json"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="BLIP/ALBEF annotation JSON"):
            read_pairs(tmp_path / "bad.json")


@pytest.mark.parametrize("block,chunk", [(7, 5), (1, 3), (1000, 64)])
def test_streamed_blocks_with_ties_across_blocks_equal_the_oracle(block, chunk):
    """The gallery streamed in blocks (keys ascending but not contiguous, as item ids are),
    integer vectors so that many scores tie exactly, within and across blocks: first ranks,
    nDCG@10 and each stage's run equal the from-the-definitions oracle, whatever the block and
    query-chunk sizes; relevant items far past the candidate list are counted exactly."""
    from vtfusion.search.ranking import rank_queries

    rng = np.random.default_rng(block)
    n_q, n_db, dim = 23, 61, 4
    db = rng.integers(-1, 2, size=(n_db, dim)).astype(np.float32)  # 81 distinct vectors at most: heavy ties
    q = rng.integers(-1, 2, size=(n_q, dim)).astype(np.float32)
    keys = np.sort(rng.choice(10_000, size=n_db, replace=False)).astype(np.int64)
    groups = rng.integers(0, 25, size=n_db)  # relevant: the gallery items of the query's group
    targets = rng.integers(0, 25, size=n_q)
    targets = np.array([t if (groups == t).any() else groups[0] for t in targets])
    itm = np.round(rng.normal(size=(n_q, n_db)), 1).astype(np.float32)
    sim = q @ db.T
    pos_of_key = {int(k): j for j, k in enumerate(keys)}
    relevant = [(keys[groups == t], db[groups == t]) for t in targets]

    def blocks():
        for s in range(0, n_db, block):
            yield keys[s : s + block], db[s : s + block]

    r = rank_queries(q, blocks(), relevant, [0, 4, 16], "itm+itc",
                     lambda qi, cand: itm[qi, [pos_of_key[int(k)] for k in cand]], chunk=chunk, keep=12)
    for depth in (0, 4, 16):
        for qi in range(n_q):
            f, _, n, ranking = _oracle(sim[qi : qi + 1], itm[qi : qi + 1], groups, targets[qi : qi + 1], depth)
            assert r.first[depth][qi] == f[0], (depth, qi)
            assert abs(r.ndcg[depth][qi] - n[0]) < 1e-12
            assert r.runs[depth][qi].tolist() == [int(keys[j]) for j in ranking[:12]]
    assert r.first[0].max() > 16  # some relevant items lie past every list kept (k = max(16, 10, 12))


def test_float_scores_rank_past_the_lists_exactly():
    """Unit float vectors (a real model's), duplicated so that equal vectors sit in different
    blocks: the counted rank of a relevant item past the top list is its position in a full
    sort of the very scores the pass computed (ties: lower key)."""
    from vtfusion.search.ranking import array_blocks, rank_queries

    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    db = np.concatenate([base, base[::-1], base[:13]])  # every vector 2-3 times, in other blocks
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rel_pos = [np.array([j]) for j in rng.choice(len(db), size=len(q))]
    r = rank_queries(q, array_blocks(db, block=11), [(p, db[p]) for p in rel_pos], [0], "itc", None, chunk=4)
    for qi, p in enumerate(rel_pos):
        c0 = qi // 4 * 4  # the pass's own products: the same query chunk against the same blocks
        s = np.concatenate([q[c0 : c0 + 4] @ db[a : a + 11].T for a in range(0, len(db), 11)], axis=1)[qi - c0]
        want = int((s > s[p[0]]).sum() + (s[: p[0]] == s[p[0]]).sum()) + 1
        assert r.first[0][qi] == want


def test_items_are_matched_by_image_bytes_and_older_rows_by_path_and_content(tmp_path, model_dir, small_catalog):
    """``items_with_images`` finds active items by the sha256 of their image bytes, whatever
    their text; a row from before migration 0003 (no image hash) is matched by its path only
    while the file still holds the bytes it was ingested from; a deleted item never matches."""
    import hashlib
    import shutil

    from sqlalchemy import update

    from vtfusion.indexer.collection import Collection
    from vtfusion.indexer.schema import Item

    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    col = tmp_path / "col"
    _cli("init", col, "--model", model_dir)
    _cli("ingest", col, cat / "train.csv", "--workers", "0")
    rows = list(csv.DictReader(open(cat / "train.csv")))[:4]
    files = [cat / r["image"] for r in rows]
    sha = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    c = Collection.open(col)
    found = c.items_with_images({h: tmp_path / "elsewhere.png" for h in sha})  # by bytes: the path does not matter
    assert sorted(found) == sorted(sha) and all(len(v) == 1 for v in found.values())
    ids = {h: v[0] for h, v in found.items()}
    with c.Session.begin() as s:  # rows as an older version wrote them
        s.execute(update(Item).values(image_hash=None))
    assert c.items_with_images({h: tmp_path / "elsewhere.png" for h in sha}) == {}
    assert c.items_with_images({h: f.resolve() for h, f in zip(sha, files)}) == {h: [ids[h]] for h in sha}
    files[0].write_bytes(files[1].read_bytes())  # a stale path: the file changed since its ingest
    got = c.items_with_images({h: f.resolve() for h, f in zip(sha, files)})
    assert sha[0] not in got and got[sha[1]] == [ids[sha[1]]]
    _cli("delete", col, "--ids", rows[1]["id"], "--yes")
    assert sha[1] not in Collection.open(col).items_with_images({h: f.resolve() for h, f in zip(sha, files)})
