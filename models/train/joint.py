"""The joint stage: ITC (symmetric InfoNCE, learned temperature) + ITM with hard negatives
(+ optionally MLM), both towers, the fusion layers and the heads trained together.

One step: the image tower and the text tower run once on the batch; ITC is computed from
their pooled embeddings; ALBEF-style hard negatives (K per image and per text) are drawn from
the in-batch ITC similarities; the fusion encoder scores B positives and 2KB negatives. ITM
is trained on those logits by ``losses.itm_objective``: ALBEF's binary cross-entropy (a
calibrated match probability) plus a listwise cross-entropy that ranks each query's positive
above its own negatives by the score search sorts by (ITM logit + ITC logit). With
``mlm_weight`` ALBEF's third objective, masked language modelling conditioned on the image,
runs the fusion encoder once more on the batch's texts with some words hidden and predicts
them, through a head the trainer owns (``losses.MLMHead``; not saved with the model).

Batches come from ``mining.batch_plan``: from the second epoch on, each pair is batched with
its nearest neighbour in the current ITC space, so in-batch negatives are hard ones.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import PairCollator, PairDataset
from ..factory import Bundle
from ..layers import gather_rows
from ..losses import IGNORE, MLMHead, itc_loss, itm_objective, mask_tokens, sample_hard_negatives
from ..negatives import WordSlots
from .config import TrainConfig
from .loop import no_decay
from .mining import batch_plan, nearest_text_neighbours, steps_per_epoch

log = logging.getLogger(__name__)

TOWER_PREFIXES = ("vision.", "text.", "image_proj.", "text_proj.", "logit_scale")  # parameter name prefixes


def mlm_head_for(bundle: Bundle, cfg: TrainConfig) -> MLMHead | None:
    """The MLM head for this model's tokenizer, or None when MLM is off or the tokenizer has no
    [MASK] token (CLIP's)."""
    if not cfg.joint.mlm_weight:
        return None
    hf = bundle.tokenizer.hf
    if getattr(hf, "mask_token_id", None) is None:
        log.info("the tokenizer has no mask token: training without masked language modelling")
        return None
    with torch.random.fork_rng(devices=[]):  # the head's initial weights, the same for a seed
        torch.manual_seed(cfg.seed + 1)
        return MLMHead(bundle.model.fusion_norm.normalized_shape[0], bundle.tokenizer.vocab_size, int(hf.mask_token_id), list(hf.all_special_ids))


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
    model, jc = bundle.model, cfg.joint
    nb = device.type == "cuda"
    pixels = bundle.transform.normalize(batch["pixels"].to(device, non_blocking=nb))  # (B, 3, S, S)
    if device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    ids, mask = batch["ids"].to(device, non_blocking=nb), batch["mask"].to(device, non_blocking=nb)  # (B, L)
    neg = batch.get("negatives")  # compositional negatives of some rows' texts (JointStage.step)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        img_tokens = model.vision(pixels)  # (B, N, D_v)
        txt_tokens = model.text(ids, mask)  # (B, L, D_t)
        img_emb = model.image_emb(img_tokens)  # (B, E)
        txt_emb = model.text_emb(txt_tokens, mask)  # (B, E)
        scale = model.logit_scale_value()
        n_rows = n_tokens = n_mask = n_emb = None
        if neg is not None:
            n_rows, n_ids, n_mask = (t.to(device) for t in neg)  # (G,), (G, L'), (G, L')
            n_tokens = model.text(n_ids, n_mask)  # (G, L', D_t)
            n_emb = model.text_emb(n_tokens, n_mask)  # (G, E)
        l_itc, sim = itc_loss(img_emb.float(), txt_emb.float(), scale, None if n_emb is None else n_emb.float())
        B = ids.shape[0]
        K = min(jc.itm_negatives, B - 1)  # a batch of B holds B - 1 negatives for each pair
        neg_txt, neg_img = sample_hard_negatives((sim * scale * hardness).detach(), gen, K)  # (B[, K]) each
        neg_txt, neg_img = neg_txt.reshape(-1), neg_img.reshape(-1)  # (B*K,): row i*K+j = j-th negative of i
        rows = torch.arange(B, device=ids.device)  # (B,)
        own = rows.repeat_interleave(K)  # (B*K,)
        # (1 + 2K)B fusion rows: positives, (image, hard text) pairs, (hard image, text) pairs
        f_img = torch.cat([rows, own, neg_img])  # ((1+2K)B,) rows -> batch images
        f_txt = torch.cat([txt_tokens, gather_rows(txt_tokens, neg_txt), gather_rows(txt_tokens, own)])  # ((1+2K)B, L, D_t)
        f_mask = torch.cat([mask, mask[neg_txt], mask[own]])  # ((1+2K)B, L)
        if n_rows is not None:  # G more rows: image r against the negative of its own text
            L = max(f_txt.shape[1], n_tokens.shape[1])
            f_txt, f_mask = pad_tokens(f_txt, f_mask, L)
            n_tokens, n_mask = pad_tokens(n_tokens, n_mask, L)
            f_img, f_txt, f_mask = torch.cat([f_img, n_rows]), torch.cat([f_txt, n_tokens]), torch.cat([f_mask, n_mask])
        logits = model.fuse(img_tokens, f_txt, f_mask, image_index=f_img)  # ((1+2K)B [+ G],)
        cos = None
        if cfg.itm_rank_weight:
            c = sim.detach().float()  # (B, B) image x text: each fusion row's ITC cosine, held fixed
            cos = torch.cat([c[rows, rows], c[own, neg_txt], c[neg_img, own]])  # ((1+2K)B,)
            if n_rows is not None:
                cos = torch.cat([cos, (img_emb[n_rows] * n_emb).sum(-1).detach().float()])
        l_itm = itm_objective(logits, cos, scale.detach(), B, K, cfg.itm_rank_weight, extra_rows=n_rows)
        loss = l_itc + jc.itm_weight * l_itm
        out = {"itc": l_itc.detach(), "itm": l_itm.detach()}
        if mlm is not None:
            # each text, some words hidden, fused with its own image; predict the hidden words
            special = ~mask.bool() | torch.isin(ids, mlm.special_ids)
            m_ids, labels = mask_tokens(ids, special, mlm.mask_id, mlm.vocab_size, gen, jc.mlm_prob)  # (B, L) each
            fused, _ = model.fuse_tokens(img_tokens, model.text(m_ids, mask), mask)  # (B, L, D_t)
            chosen = labels != IGNORE
            if bool(chosen.any()):
                l_mlm = F.cross_entropy(mlm(fused[chosen]).float(), labels[chosen])
            else:  # no word drawn this step (tiny batches)
                l_mlm = fused.sum().float() * 0.0
            loss = loss + jc.mlm_weight * l_mlm
            out["mlm"] = l_mlm.detach()
    return {"loss": loss, **out}


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens (G, L', D) and mask (G, L') padded at the end to ``length`` (zeros, masked
    out): what fusion reads of padding is nothing (its keys are masked, the ITM head pools the
    real tokens)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def text_negatives(slots: WordSlots, texts: list[str], tokenizer, seed: int, stage: str, step: int, k: int = 1):
    """(rows (G,), ids (G, L), mask (G, L)): compositional negatives of the texts (one each, or
    up to ``k`` of different slots; a row repeats for each of its text's negatives, in row
    order), tokenised; or None. Drawn from a generator named by (seed, stage, step), so a
    resumed run draws what the uninterrupted one did."""
    per = slots.negative_lists(texts, random.Random(f"{seed}-{stage}-{step}"), k)
    rows = [i for i, ns in enumerate(per) for _ in ns]
    negs = [n for ns in per for n in ns]
    if not rows:
        return None
    ids, mask = tokenizer(negs)
    return torch.tensor(rows, dtype=torch.long), ids, mask


class JointStage:
    name, kind, checkpoint_at_end = "train", "joint", True

    def __init__(self, bundle: Bundle, dataset: PairDataset, cfg: TrainConfig, device: torch.device, slots: WordSlots | None = None):
        self.bundle, self.dataset, self.cfg, self.device = bundle, dataset, cfg, device
        self.slots = slots  # compositional text negatives (cfg.text_negatives)
        self.epochs = cfg.epochs
        self.steps_per_epoch = steps_per_epoch(len(dataset), cfg.batch_size)
        self.warmup_steps = cfg.warmup_steps
        if cfg.joint.freeze_towers:
            for name, p in bundle.model.named_parameters():
                if name.startswith(TOWER_PREFIXES):
                    p.requires_grad_(False)
        self.mlm = mlm_head_for(bundle, cfg)
        if self.mlm is not None:
            self.mlm.to(device).train()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.collate = PairCollator(bundle.tokenizer)

    def start(self) -> None:
        self.bundle.model.train()

    def param_groups(self) -> list[dict]:
        """AdamW groups by (pretrained, no weight decay); the MLM head, when there is one, is
        trained from scratch like the fusion layers."""
        cfg = self.cfg
        source = self.bundle.config.text.source
        pretrained = ("text.",) if source == "pretrained" else TOWER_PREFIXES if source == "clip" else ()
        if self.bundle.config.vision.weights_from:  # a CNN loaded from torchvision-format weights
            pretrained = (*pretrained, "vision.stem.", "vision.stages.")
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self._named():
            if not p.requires_grad:
                continue
            is_pre = name.startswith(pretrained)  # () matches nothing
            groups.setdefault((is_pre, no_decay(name, p)), []).append(p)
        out = []
        for (is_pre, nd), params in sorted(groups.items()):
            lr = cfg.lr * (cfg.joint.pretrained_lr_scale if is_pre else 1.0)
            out.append({"params": params, "lr": lr, "weight_decay": 0.0 if nd else cfg.weight_decay})
        return out

    def _named(self) -> list[tuple[str, nn.Parameter]]:
        named = list(self.bundle.model.named_parameters())
        if self.mlm is not None:
            named += [(f"mlm.{n}", p) for n, p in self.mlm.named_parameters()]
        return named

    def clip_params(self) -> list[nn.Parameter]:
        return [p for _, p in self._named()]

    def modules(self) -> dict[str, nn.Module]:
        return {"mlm": self.mlm} if self.mlm is not None else {}

    def restore(self, modules: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
        has_mlm = "mlm" in modules
        if (self.mlm is not None) != has_mlm:
            raise ValueError(
                f"the checkpoint {folder} was trained {'with' if has_mlm else 'without'} masked language modelling; "
                f"resume with the same setting (--mlm-weight {'1' if has_mlm else '0'})"
            )
        if self.mlm is not None:
            self.mlm.load_state_dict(modules["mlm"])

    def begin_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def plan(self, epoch: int) -> list[list[int]]:
        mine = self.cfg.joint.mine_batches and epoch > 0
        neighbour = nearest_text_neighbours(self.bundle, self.dataset, self.device) if mine else None
        return batch_plan(len(self.dataset), self.cfg.batch_size, self.cfg.seed, epoch, neighbour)

    def batches(self, plan: list[list[int]]) -> Iterable[dict[str, torch.Tensor]]:
        return DataLoader(
            self.dataset, batch_sampler=plan, collate_fn=self.collate, num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def step(self, batch: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], int]:
        ramp = self.cfg.joint.hard_negative_ramp
        hardness = min(1.0, step / ramp) if ramp else 1.0
        if self.slots is not None:
            batch = {**batch, "negatives": text_negatives(self.slots, batch["texts"], self.bundle.tokenizer, self.cfg.seed, "joint", step, self.cfg.negatives_per_text)}
            if batch["negatives"] is None:
                del batch["negatives"]
        return train_step(self.bundle, batch, self.generator, self.cfg, self.device, hardness, self.mlm), batch["ids"].shape[0]
