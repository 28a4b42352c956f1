"""Training loop: ITC (symmetric InfoNCE, learned temperature) + ITM with hard negatives (+ MLM).

One step: the image tower and the text tower run once on the batch; ITC is computed from
their pooled embeddings; ALBEF-style hard negatives (K per image and per text) are drawn from
the in-batch ITC similarities; the fusion encoder scores B positives and 2KB negatives. ITM
is trained twice over on those logits: ALBEF's binary cross-entropy (a calibrated match
probability) and a listwise cross-entropy that ranks each query's positive above its own
negatives by the score search sorts by (ITM logit + ITC logit). Optionally (``mlm_weight``,
off by default) ALBEF's third objective, masked language modelling conditioned on the image,
runs the fusion encoder once more on the batch's texts with 15 % of their words hidden and
predicts them (a head owned by the trainer, not saved with the model). In the demo's 16-epoch
CPU budget it cost the rerank gain (seed 0: +20.0 -> +1.8 R@1; see the README), so it is an
option for longer runs, not the default.

Then (``rerank_epochs``, 8 by default) a second stage trains the fusion layers and ITM head
alone, towers frozen, on the candidates ITC itself retrieves for each training pair over the
whole training set (``tune_reranker``): the reranker learns on the task search gives it. On
the demo catalog it raised the rerank gain on every seed (see the README).

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA.
Checkpoints every N steps under ``OUT/checkpoints/step-XXXXXXX/`` (a model folder plus
``trainer.safetensors`` / ``trainer.json`` holding optimizer and RNG state: no pickle);
``resume=True`` continues from the newest one. On CPU with an epoch budget the run is
bit-reproducible for a seed, resumed or not (rows are gathered with ``gather_rows``, whose
backward is a matrix product: indexing's backward accumulates with atomics in parallel on the
CPU and made two runs of one seed drift apart at the default size). With a time budget (``minutes``) the learning
rate follows elapsed time instead of steps, so the schedule completes when time runs out; the
second stage gets ``rerank_share`` of the budget (none by default) plus whatever the joint
stage leaves, and stops on the clock too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file
from torch import nn
from torch.utils.data import DataLoader

from . import factory
from .factory import Bundle
from .data import PairCollator, PairDataset
from .fusion import fused_score
from .layers import gather_rows
from .losses import IGNORE, itc_loss, itm_loss, itm_rank_loss, mask_tokens, sample_hard_negatives
from .progress import progress as progress_bar
from .validate import embed_images

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = 10  # passes over the data (None: until the time budget runs out)
    minutes: float | None = None  # wall-clock budget; stops at whichever of epochs/minutes ends first
    batch_size: int = 64  # pairs per step (also the pool hard negatives are drawn from)
    lr: float = 1e-3  # peak learning rate of the parts trained from scratch
    pretrained_lr_scale: float = 0.1  # multiplier for pretrained parts (a pretrained text tower; CLIP's towers)
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to this fraction of the peak
    grad_clip: float = 10.0  # max global gradient norm (1.0 starves ITM: early norms are 20-100)
    itm_weight: float = 1.0  # loss = itc + itm_weight * itm (3 helped ITM after 3 CPU minutes, not after 10: see README)
    itm_negatives: int = 2  # hard negatives per image and per text for ITM (ALBEF: 1)
    itm_rank_weight: float = 1.0  # listwise ITM loss: each query's positive vs its own hard negatives (0: ALBEF's BCE only)
    hard_negative_ramp: int = 300  # steps over which ITM negatives go from uniform to ITC-hard
    mlm_weight: float = 0.0  # image-conditioned masked language modelling (ALBEF), off by default: see README
    mlm_prob: float = 0.15  # share of words hidden
    # second stage: the fusion layers and ITM head alone, towers frozen, on the candidates ITC
    # itself retrieves for every training pair (see tune_reranker); 0 epochs: no second stage
    rerank_epochs: int = 8
    rerank_lr_scale: float = 2.0  # its peak learning rate, x lr (stable with the towers frozen; 3x lr in the joint stage is not)
    rerank_pool: int = 32  # negatives come from each query's top rerank_pool ITC candidates
    rerank_negatives: int = 4  # drawn per query and direction, in proportion to softmax(ITC logits)
    # of a `minutes` budget, kept for the second stage (the joint stage gets the rest). 0: the joint
    # stage takes it all and the second stage runs only on what it leaves (an 8-minute budget on
    # the demo catalog: a quarter for the second stage cost more ITC than reranking won back)
    rerank_share: float = 0.0
    mine_batches: bool = True  # from epoch 1 on, batch each pair with its ITC nearest neighbour
    checkpoint_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda[:n]
    progress: bool = True
    freeze_towers: bool = False  # train only the fusion layers and ITM head (towers, projections, temperature fixed)

    def __post_init__(self):
        if self.epochs is None and self.minutes is None:
            raise ValueError("give epochs, minutes, or both")
        if self.rerank_epochs < 0 or self.rerank_pool < 2 or self.rerank_negatives < 1 or self.rerank_lr_scale <= 0:
            raise ValueError("rerank_epochs must be >= 0, rerank_pool >= 2, rerank_negatives >= 1 and rerank_lr_scale > 0")
        if not 0 <= self.rerank_share < 1:
            raise ValueError(f"rerank_share must be in [0, 1); got {self.rerank_share}")
        if self.itm_negatives < 1 or self.itm_rank_weight < 0 or self.mlm_weight < 0:
            raise ValueError("itm_negatives must be at least 1, itm_rank_weight and mlm_weight at least 0")
        if not 0 < self.mlm_prob < 1:
            raise ValueError(f"mlm_prob must be in (0, 1); got {self.mlm_prob}")


TOWER_PREFIXES = ("vision.", "text.", "image_proj.", "text_proj.", "logit_scale")  # parameter name prefixes
FUSION_PREFIXES = ("fusion.", "fusion_norm.", "itm_head.")


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    seconds: float
    losses: list[float] = field(default_factory=list)  # total loss per step (this run)
    stopped_by: str = "epochs"  # "epochs" | "minutes"
    rerank_steps: int = 0  # second-stage steps (fusion layers alone, see tune_reranker)
    rerank_seconds: float = 0.0
    rerank_losses: list[float] = field(default_factory=list)


def lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_ratio`` as progress goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norms, the temperature and position embeddings get no weight decay."""
    return p.dim() < 2 or name.endswith("logit_scale") or name.startswith("vision.pos")


def _param_groups(bundle: Bundle, cfg: TrainConfig, mlm: nn.Module | None = None) -> list[dict]:
    """AdamW groups by (pretrained, no weight decay); the trainer's MLM head, when there is one,
    is trained from scratch like the fusion layers."""
    source = bundle.config.text.source
    pretrained = ("text.",) if source == "pretrained" else TOWER_PREFIXES if source == "clip" else ()
    groups: dict[tuple[bool, bool], list] = {}
    named = list(bundle.model.named_parameters())
    if mlm is not None:
        named += [(f"mlm.{n}", p) for n, p in mlm.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        is_pre = name.startswith(pretrained)  # () matches nothing
        groups.setdefault((is_pre, _no_decay(name, p)), []).append(p)
    out = []
    for (is_pre, no_decay), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.pretrained_lr_scale if is_pre else 1.0)
        out.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return out


def _batches(n: int, batch_size: int, seed: int, epoch: int, neighbour: list[int] | None = None) -> list[list[int]]:
    """This epoch's batches: a seeded permutation, the last short batch dropped when n > batch.

    With ``neighbour`` (item -> its nearest other item) each item is followed by its
    neighbour when that one is still unplaced, so most batches hold the pairs the model
    confuses most: hard negatives for ITC and ITM alike (twins, near-duplicates).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()
    if neighbour is not None:
        placed, order = [False] * n, []
        for i in perm:
            if not placed[i]:
                placed[i] = True
                order.append(i)
                j = neighbour[i]
                if not placed[j]:
                    placed[j] = True
                    order.append(j)
        perm = order
    size = min(batch_size, n)
    return [perm[i : i + size] for i in range(0, n - size + 1, size)]


def _sims_without_self(queries: torch.Tensor, docs: torch.Tensor, chunk: int):
    """Cosines of ``chunk`` queries at a time against every document, (c, n) each, with query
    i's own document i (the two are sides of the same n pairs) set to -inf."""
    for i in range(0, queries.shape[0], chunk):
        sim = queries[i : i + chunk] @ docs.t()  # (c, n)
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + i] = float("-inf")
        yield sim


@torch.no_grad()
def nearest_text_neighbours(bundle: Bundle, dataset: PairDataset, device, chunk: int = 256) -> list[int]:
    """For every pair, the other pair whose text is closest in the current ITC space
    (streamed in chunks: memory is (chunk, n), never (n, n))."""
    model = bundle.model
    was_training = model.training
    model.eval()
    texts = [dataset.text(i) for i in range(len(dataset))]
    embs = []
    for i in range(0, len(texts), chunk):
        ids, mask = bundle.tokenizer(texts[i : i + chunk])
        embs.append(model.encode_text(ids.to(device), mask.to(device)).float())
    emb = torch.cat(embs)  # (n, E)
    out = [j for sim in _sims_without_self(emb, emb, chunk) for j in sim.argmax(dim=1).tolist()]
    model.train(was_training)
    return out


class MLMHead(nn.Module):
    """BERT's prediction head over the fused text tokens: dense, GELU, LayerNorm, vocabulary.

    Owned by the trainer (its weights live in the checkpoints' trainer state, not in the
    model folder): search never predicts words."""

    def __init__(self, width: int, vocab_size: int, mask_id: int, special_ids: list[int]):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))  # (..., vocab)


def mlm_head_for(bundle: Bundle, cfg: TrainConfig) -> MLMHead | None:
    """The MLM head for this model's tokenizer, or None when MLM is off or the tokenizer has no
    [MASK] token (CLIP's)."""
    if not cfg.mlm_weight:
        return None
    hf = bundle.tokenizer.hf
    if getattr(hf, "mask_token_id", None) is None:
        log.info("the tokenizer has no mask token: training without masked language modelling")
        return None
    with torch.random.fork_rng(devices=[]):  # the head's initial weights, the same for a seed
        torch.manual_seed(cfg.seed + 1)
        return MLMHead(bundle.model.fusion_norm.normalized_shape[0], bundle.tokenizer.vocab_size, int(hf.mask_token_id), list(hf.all_special_ids))


# ---- trainer state (no pickle) -------------------------------------------------------------


def _save_state(folder: Path, opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict, mlm: MLMHead | None = None) -> None:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    if mlm is not None:
        tensors.update({f"mlm.{k}": v.detach().cpu().contiguous() for k, v in mlm.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.negatives"] = gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / "trainer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "trainer.json").write_text(json.dumps({**meta, "param_groups": groups}, indent=1))


def _load_state(folder: Path, opt: torch.optim.Optimizer, gen: torch.Generator, mlm: MLMHead | None = None) -> dict:
    tensors = load_file(str(folder / "trainer.safetensors"))
    meta = json.loads((folder / "trainer.json").read_text())
    has_mlm = any(k.startswith("mlm.") for k in tensors)
    if (mlm is not None) != has_mlm:
        raise ValueError(
            f"the checkpoint {folder} was trained {'with' if has_mlm else 'without'} masked language modelling; "
            f"resume with the same setting (--mlm-weight {'1' if has_mlm else '0'})"
        )
    if mlm is not None:
        mlm.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlm.")})
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    groups = meta.pop("param_groups")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.negatives"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = sorted((Path(out_dir) / CHECKPOINTS).glob("step-*"))
    ckpts = [c for c in ckpts if (c / "trainer.json").exists()]  # written last: a complete checkpoint
    return ckpts[-1] if ckpts else None


def _write_checkpoint(out_dir: Path, bundle: Bundle, opt, gen, meta: dict, keep: int, mlm: MLMHead | None = None) -> Path:
    root = out_dir / CHECKPOINTS
    folder = root / f"step-{meta['step']:07d}"
    tmp = root / f".tmp-{meta['step']:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    factory.save(bundle, tmp)
    _save_state(tmp, opt, gen, meta, mlm)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint folder is complete or absent
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


# ---- the loop ------------------------------------------------------------------------------


def itm_objective(logits: torch.Tensor, cos: torch.Tensor | None, scale, B: int, K: int, rank_weight: float) -> torch.Tensor:
    """The ITM loss over (1 + 2K)B fusion rows laid out as B positives, then each image against
    its K negative texts, then each text against its K negative images: ALBEF's binary loss,
    plus (``rank_weight``) the listwise loss ranking each query's positive above its own
    negatives by what search ranks them by (``fused_score``). ``cos``: each row's ITC cosine,
    held fixed, so ITM learns what ITC gets wrong rather than relearning it (unused, may be
    None, when ``rank_weight`` is 0)."""
    loss = itm_loss(logits[:B], logits[B:])
    if rank_weight:
        fused = fused_score(logits.float(), cos, scale)  # ((1+2K)B,)
        pos, neg_t, neg_i = fused[:B], fused[B : B + B * K].view(B, K), fused[B + B * K :].view(B, K)
        loss = loss + rank_weight * (itm_rank_loss(pos, neg_t) + itm_rank_loss(pos, neg_i)) / 2
    return loss


def train_step(
    bundle: Bundle,
    batch: dict[str, torch.Tensor],
    gen: torch.Generator,
    cfg: TrainConfig,
    device,
    hardness: float = 1.0,
    mlm: MLMHead | None = None,
) -> dict[str, torch.Tensor]:
    """Forward one batch and return the losses (no backward).

    ``hardness`` in [0, 1] scales the ITC logits the negatives are drawn from: 0 draws them
    uniformly, 1 as ALBEF does. Starting easy lets the fusion layers learn to match at all
    before they must separate near-identical pairs (from scratch, hard negatives alone keep
    ITM at its prior for hundreds of steps).
    """
    model = bundle.model
    nb = device.type == "cuda"
    pixels = bundle.transform.normalize(batch["pixels"].to(device, non_blocking=nb))  # (B, 3, S, S)
    if device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    ids, mask = batch["ids"].to(device, non_blocking=nb), batch["mask"].to(device, non_blocking=nb)  # (B, L)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        img_tokens = model.vision(pixels)  # (B, N, D_v)
        txt_tokens = model.text(ids, mask)  # (B, L, D_t)
        img_emb = model.image_emb(img_tokens)  # (B, E)
        txt_emb = model.text_emb(txt_tokens, mask)  # (B, E)
        scale = model.logit_scale_value()
        l_itc, sim = itc_loss(img_emb.float(), txt_emb.float(), scale)
        B = ids.shape[0]
        K = min(cfg.itm_negatives, B - 1)  # a batch of B holds B - 1 negatives for each pair
        neg_txt, neg_img = sample_hard_negatives((sim * scale * hardness).detach(), gen, K)  # (B[, K]) each
        neg_txt, neg_img = neg_txt.reshape(-1), neg_img.reshape(-1)  # (B*K,): row i*K+j = j-th negative of i
        rows = torch.arange(B, device=ids.device)  # (B,)
        own = rows.repeat_interleave(K)  # (B*K,)
        # (1 + 2K)B fusion rows: positives, (image, hard text) pairs, (hard image, text) pairs
        f_img = torch.cat([rows, own, neg_img])  # ((1+2K)B,) rows -> batch images
        f_txt = torch.cat([txt_tokens, gather_rows(txt_tokens, neg_txt), gather_rows(txt_tokens, own)])  # ((1+2K)B, L, D_t)
        f_mask = torch.cat([mask, mask[neg_txt], mask[own]])  # ((1+2K)B, L)
        logits = model.fuse(img_tokens, f_txt, f_mask, image_index=f_img)  # ((1+2K)B,)
        cos = None
        if cfg.itm_rank_weight:
            c = sim.detach().float()  # (B, B) image x text: each fusion row's ITC cosine, held fixed
            cos = torch.cat([c[rows, rows], c[own, neg_txt], c[neg_img, own]])  # ((1+2K)B,)
        l_itm = itm_objective(logits, cos, scale.detach(), B, K, cfg.itm_rank_weight)
        loss = l_itc + cfg.itm_weight * l_itm
        out = {"itc": l_itc.detach(), "itm": l_itm.detach()}
        if mlm is not None:
            # each text, some words hidden, fused with its own image; predict the hidden words
            special = ~mask.bool() | torch.isin(ids, mlm.special_ids)
            m_ids, labels = mask_tokens(ids, special, mlm.mask_id, mlm.vocab_size, gen, cfg.mlm_prob)  # (B, L) each
            fused, _ = model.fuse_tokens(img_tokens, model.text(m_ids, mask), mask)  # (B, L, D_t)
            chosen = labels != IGNORE
            if bool(chosen.any()):
                l_mlm = F.cross_entropy(mlm(fused[chosen]).float(), labels[chosen])
            else:  # no word drawn this step (tiny batches)
                l_mlm = fused.sum().float() * 0.0
            loss = loss + cfg.mlm_weight * l_mlm
            out["mlm"] = l_mlm.detach()
    return {"loss": loss, **out}


# ---- second stage: the reranker on the retriever's own candidates ----------------------------


@torch.no_grad()
def itc_candidates(queries: torch.Tensor, docs: torch.Tensor, pool: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top ``pool`` documents by cosine. Queries and docs are the two sides of the
    same n pairs, so query i's own document i (its positive) is left out. -> (values, indices),
    each (n, pool); in chunks of ``chunk`` queries, so memory is (chunk, n), never (n, n)."""
    pool = min(pool, docs.shape[0] - 1)
    tops = [sim.topk(pool, dim=1) for sim in _sims_without_self(queries, docs, chunk)]
    return torch.cat([v for v, _ in tops]), torch.cat([j for _, j in tops])


def _sample_from_pool(values: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, scale: float, k: int, gen) -> torch.Tensor:
    """For each row r, k distinct candidates of ``index[r]`` drawn in proportion to
    softmax(scale x cosine): the ones ITC is likeliest to rank above the positive are trained on
    most, as ALBEF draws in-batch negatives. -> (len(rows), k) document indices."""
    w = (values[rows] * scale).float().softmax(dim=1) + 1e-9  # (b, pool)
    pick = torch.multinomial(w, min(k, w.shape[1]), generator=gen)  # (b, k), no repeats
    return index[rows].gather(1, pick)


def tune_reranker(bundle: Bundle, dataset: PairDataset, cfg: TrainConfig, device, seconds: float | None = None) -> tuple[int, list[float]]:
    """Second stage: train the fusion layers and ITM head alone, towers frozen, on the
    candidates ITC itself retrieves for every training pair. Returns (steps, losses).
    ``seconds``: a time budget (what ``minutes`` left it); it then stops at whichever of
    ``rerank_epochs`` and the budget ends first, its learning rate following elapsed time.

    Joint training teaches ITM on in-batch negatives while the towers move under it; a
    reranker at search time sees something else: a query's top ITC candidates over the whole
    collection, tokens from towers in inference mode. Here every pair's image tokens and ITC
    embeddings are computed once (inference mode, so ITM trains on exactly what the token
    cache will hold); each epoch, every text's top ``rerank_pool`` images and every image's top
    ``rerank_pool`` texts are found over the whole training set, and ``rerank_negatives`` of
    each are drawn as negatives. The losses are the first stage's ITM losses (binary +
    listwise on the fused score). A step runs no tower, but the fusion layers on (1 + 2K) x B
    rows, about a joint step's cost: what the stage buys is aim, not speed. ITC embeddings do
    not change: ITC-only search is unaffected. Every pair's image tokens are held in memory
    (n x N x D_v floats: 33 kB per pair for the default model).
    """
    t0 = time.perf_counter()
    model = bundle.model
    model.eval()  # towers as at inference (BatchNorm running statistics)
    model.fusion.train()
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(FUSION_PREFIXES)]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        ],
        lr=cfg.lr * cfg.rerank_lr_scale, betas=(0.9, 0.98), eps=1e-6,
    )
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + 2)
    n = len(dataset)
    img_emb, img_tokens = embed_images(bundle, dataset.pixels_all(), batch_size=256)  # (n, E), (n, N, D_v)
    img_emb = img_emb.float()
    scale = float(model.logit_scale_value().detach())
    size = min(cfg.batch_size, n)
    steps_per_epoch = n // size
    total = cfg.rerank_epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, max(1, total // 10))
    step, losses = 0, []
    bar = progress_bar(total=total, desc="tune reranker", unit="step", enabled=cfg.progress)

    def out_of_time() -> bool:
        return seconds is not None and time.perf_counter() - t0 >= seconds

    for epoch in range(cfg.rerank_epochs):
        if out_of_time():
            break
        dataset.set_epoch(cfg.epochs + epoch if cfg.epochs is not None else epoch)  # texts drawn anew
        with torch.no_grad():
            ids, mask = bundle.tokenizer([dataset.text(i) for i in range(n)])
            ids, mask = ids.to(device), mask.to(device)
            txt_tokens = torch.cat([model.text_tokens(ids[i : i + 512], mask[i : i + 512]) for i in range(0, n, 512)])
            txt_emb = model.text_emb(txt_tokens, mask).float()  # (n, E)
            # candidate lists on the CPU, where the seeded generator draws from them
            t2i_val, t2i_idx = (t.cpu() for t in itc_candidates(txt_emb, img_emb, cfg.rerank_pool))  # each text's images
            i2t_val, i2t_idx = (t.cpu() for t in itc_candidates(img_emb, txt_emb, cfg.rerank_pool))  # each image's texts
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if out_of_time():
                break
            rows = perm[b * size : (b + 1) * size]  # (B,) pairs
            K = min(cfg.rerank_negatives, t2i_idx.shape[1])
            neg_img = _sample_from_pool(t2i_val, t2i_idx, rows, scale, K, gen).reshape(-1)  # (B*K,)
            neg_txt = _sample_from_pool(i2t_val, i2t_idx, rows, scale, K, gen).reshape(-1)  # (B*K,)
            own = rows.repeat_interleave(K)  # (B*K,)
            f_img = torch.cat([rows, own, neg_img]).to(device)  # ((1+2K)B,) into img_tokens
            f_txt = torch.cat([rows, neg_txt, own]).to(device)  # ((1+2K)B,) into txt_tokens
            progress = step / max(total, 1)
            if seconds:
                progress = max(progress, (time.perf_counter() - t0) / seconds)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(progress, step, warmup, cfg.min_lr_ratio)
            f_mask = mask[f_txt]
            width = int(f_mask.sum(1).max())  # padding is at the end: drop the columns no row uses
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                used, where = torch.unique(f_img, return_inverse=True)  # distinct images: their keys/values once
                logits = model.fuse(
                    img_tokens[used], txt_tokens[f_txt, :width], f_mask[:, :width], image_index=where
                ).float()
            cos = (img_emb[f_img] * txt_emb[f_txt]).sum(-1)  # ((1+2K)B,)
            loss = itm_objective(logits, cos, scale, rows.shape[0], K, cfg.itm_rank_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"reranker loss became {losses[-1]} at step {step}; lower --lr")
            bar.update(1)
            bar.set_postfix(itm=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    return step, losses


def train(bundle: Bundle, dataset: PairDataset, out_dir: str | Path, cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train ``bundle.model`` in place on ``dataset``; writes the final model folder to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = factory.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = bundle.model.to(device)
    if device.type == "cuda":
        model.vision.to(memory_format=torch.channels_last)
    model.train()
    if cfg.freeze_towers:
        for name, p in model.named_parameters():
            if name.startswith(TOWER_PREFIXES):
                p.requires_grad_(False)
    mlm = mlm_head_for(bundle, cfg)
    if mlm is not None:
        mlm.to(device).train()
    opt = torch.optim.AdamW(_param_groups(bundle, cfg, mlm), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    clip_params = list(model.parameters()) + (list(mlm.parameters()) if mlm is not None else [])
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(_batches(len(dataset), cfg.batch_size, 0, 0))
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs is not None else None
    total_budget = cfg.minutes * 60 if cfg.minutes is not None else None
    # a time budget keeps rerank_share of itself for the second stage; the joint stage's
    # schedule completes in the rest
    budget = total_budget * (1 - cfg.rerank_share) if total_budget is not None and cfg.rerank_epochs else total_budget

    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    epoch_batches: list[list[int]] | None = None  # this epoch's batch plan (checkpointed: it depends on the model)
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            log.warning("--resume: no checkpoint under %s; starting from scratch", out_dir / CHECKPOINTS)
        else:
            load_model(model, str(ckpt / factory.WEIGHTS_NAME), device=str(device))
            state = _load_state(ckpt, opt, gen, mlm)
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            elapsed_before = state.get("elapsed", 0.0)
            epoch_batches = state.get("epoch_batches")
            log.info("resumed from %s (step %d, epoch %d)", ckpt, step, epoch)

    collate = PairCollator(bundle.tokenizer)
    result = TrainResult(steps=step, epochs_done=0.0, seconds=0.0)
    t0 = time.perf_counter()
    pairs_seen, t_rate = 0, time.perf_counter()
    bar = progress_bar(total=total_steps, initial=step, desc="train", unit="step", enabled=cfg.progress)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def meta() -> dict:
        return {
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "elapsed": elapsed(),
            "epoch_batches": epoch_batches,
            "train_config": dataclasses.asdict(cfg),
        }

    stop = None
    while stop is None:
        if cfg.epochs is not None and epoch >= cfg.epochs:
            stop = "epochs"
            break
        dataset.set_epoch(epoch)
        if epoch_batches is None:
            neighbour = nearest_text_neighbours(bundle, dataset, device) if cfg.mine_batches and epoch > 0 else None
            epoch_batches = _batches(len(dataset), cfg.batch_size, cfg.seed, epoch, neighbour)
        batches = epoch_batches[batch_in_epoch:]
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for batch in loader:
            if budget is not None and elapsed() >= budget:
                stop = "minutes"
                break
            progress = step / total_steps if total_steps else 0.0
            if budget is not None:
                progress = max(progress, elapsed() / budget)
            factor = lr_factor(progress, step, cfg.warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            hardness = min(1.0, step / cfg.hard_negative_ramp) if cfg.hard_negative_ramp else 1.0
            out = train_step(bundle, batch, gen, cfg, device, hardness, mlm)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip)
            opt.step()
            step += 1
            batch_in_epoch += 1
            loss = float(out["loss"].detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr or check the data")
            result.losses.append(loss)
            pairs_seen += batch["ids"].shape[0]
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}", itc=f"{float(out['itc']):.3f}", itm=f"{float(out['itm']):.3f}",
                **({"mlm": f"{float(out['mlm']):.3f}"} if "mlm" in out else {}),
                pairs_s=f"{pairs_seen / max(now - t_rate, 1e-9):.0f}", refresh=False,
            )
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _write_checkpoint(out_dir, bundle, opt, gen, meta(), cfg.keep_checkpoints, mlm)
        else:
            epoch += 1
            batch_in_epoch = 0
            epoch_batches = None
    bar.close()
    model.eval()
    _write_checkpoint(out_dir, bundle, opt, gen, meta(), cfg.keep_checkpoints, mlm)
    result.steps = step
    result.epochs_done = epoch + batch_in_epoch / max(steps_per_epoch, 1)
    result.seconds = elapsed()
    result.stopped_by = stop
    log.info("trained %d steps (%.2f epochs) in %.0f s, stopped by %s", step, result.epochs_done, result.seconds, stop)
    if cfg.rerank_epochs:
        # from the joint run's final checkpoint: a resumed run redoes this stage (bit for bit
        # with an epoch budget); with a time budget it gets what the joint stage left
        t_tune = time.perf_counter()
        left = None if total_budget is None else total_budget - elapsed()
        if left is None or left > 0:
            result.rerank_steps, result.rerank_losses = tune_reranker(bundle, dataset, cfg, device, seconds=left)
            result.rerank_seconds = time.perf_counter() - t_tune
            log.info("then %d reranker steps in %.0f s", result.rerank_steps, result.rerank_seconds)
    factory.save(bundle, out_dir)
    return result
