"""The reranker stage: the fusion layers and ITM head alone, towers frozen, trained on the
candidates ITC itself retrieves for every training pair.

Joint training teaches ITM on in-batch negatives while the towers move under it; a reranker
at search time sees something else: a query's top ITC candidates over the whole collection,
tokens from towers in inference mode. Here every pair's image tokens and ITC embeddings are
computed once (inference mode, so ITM trains on exactly what the token cache will hold); each
epoch, every text's top ``pool`` images and every image's top ``pool`` texts are found over the
whole training set (``mining.itc_candidates``), and ``negatives`` of each are drawn
(``mining.sample_from_pool``). The objective is the joint stage's ITM objective. A step runs
no tower, but the fusion layers on (1 + 2K) x B rows, about a joint step's cost: what the
stage buys is aim, not speed. ITC embeddings do not change: ITC-only search is unaffected.
Every pair's image tokens are held in memory (n x N x D_v floats: 33 kB per pair for the
default model).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..data import PairDataset
from ..factory import Bundle
from ..losses import itm_objective
from ..negatives import WordSlots
from ..validate import embed_images
from .config import TrainConfig
from .joint import pad_tokens, text_negatives
from .loop import no_decay
from .mining import itc_candidates, sample_from_pool, steps_per_epoch

FUSION_PREFIXES = ("fusion.", "fusion_norm.", "itm_head.")  # parameter name prefixes this stage trains


class RerankStage:
    name, kind, checkpoint_at_end = "tune reranker", "rerank", False

    def __init__(self, bundle: Bundle, dataset: PairDataset, cfg: TrainConfig, device: torch.device, slots: WordSlots | None = None):
        self.bundle, self.dataset, self.cfg, self.device = bundle, dataset, cfg, device
        self.slots = slots  # compositional text negatives (cfg.text_negatives)
        rc = cfg.rerank
        self.epochs = rc.epochs
        n = len(dataset)
        self.size = min(cfg.batch_size, n)
        self.steps_per_epoch = steps_per_epoch(n, cfg.batch_size)
        self.warmup_steps = min(cfg.warmup_steps, max(1, rc.epochs * self.steps_per_epoch // 10))
        self.named = [(name, p) for name, p in bundle.model.named_parameters() if name.startswith(FUSION_PREFIXES)]
        self.generator = torch.Generator().manual_seed(cfg.seed * 7_919 + 2)

    def start(self) -> None:
        model = self.bundle.model
        model.eval()  # towers as at inference (BatchNorm running statistics)
        model.fusion.train()
        img_emb, self.img_tokens = embed_images(self.bundle, self.dataset.pixels_all(), batch_size=256)  # (n, E), (n, N, D_v)
        self.img_emb = img_emb.float()
        self.scale = float(model.logit_scale_value().detach())

    def param_groups(self) -> list[dict]:
        lr = self.cfg.lr * self.cfg.rerank.lr_scale
        return [
            {"params": [p for n, p in self.named if not no_decay(n, p)], "lr": lr, "weight_decay": self.cfg.weight_decay},
            {"params": [p for n, p in self.named if no_decay(n, p)], "lr": lr, "weight_decay": 0.0},
        ]

    def clip_params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def restore(self, modules: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
        pass  # the stage owns no module beside the model

    @torch.no_grad()
    def begin_epoch(self, epoch: int) -> None:
        cfg, model, n = self.cfg, self.bundle.model, len(self.dataset)
        self.dataset.set_epoch(cfg.epochs + epoch if cfg.epochs is not None else epoch)  # texts drawn anew
        self.texts = [self.dataset.text(i) for i in range(n)]
        ids, mask = self.bundle.tokenizer(self.texts)
        self.mask = mask.to(self.device)
        ids = ids.to(self.device)
        self.txt_tokens = torch.cat([model.text_tokens(ids[i : i + 512], self.mask[i : i + 512]) for i in range(0, n, 512)])
        self.txt_emb = model.text_emb(self.txt_tokens, self.mask).float()  # (n, E)
        # candidate lists on the CPU, where the seeded generator draws from them
        pool = cfg.rerank.pool
        self.t2i = tuple(t.cpu() for t in itc_candidates(self.txt_emb, self.img_emb, pool))  # each text's images
        self.i2t = tuple(t.cpu() for t in itc_candidates(self.img_emb, self.txt_emb, pool))  # each image's texts

    def plan(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(len(self.dataset), generator=self.generator)
        return [perm[b * self.size : (b + 1) * self.size].tolist() for b in range(self.steps_per_epoch)]

    def batches(self, plan: list[list[int]]) -> Iterable[torch.Tensor]:
        return (torch.tensor(rows, dtype=torch.long) for rows in plan)

    def step(self, rows: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """``rows`` (B,) pairs; K negatives per query and direction from its ITC candidates."""
        model, device, gen = self.bundle.model, self.device, self.generator
        K = min(self.cfg.rerank.negatives, self.t2i[1].shape[1])
        neg_img = sample_from_pool(*self.t2i, rows, self.scale, K, gen).reshape(-1)  # (B*K,)
        neg_txt = sample_from_pool(*self.i2t, rows, self.scale, K, gen).reshape(-1)  # (B*K,)
        own = rows.repeat_interleave(K)  # (B*K,)
        f_img = torch.cat([rows, own, neg_img]).to(device)  # ((1+2K)B,) into img_tokens
        f_txt = torch.cat([rows, neg_txt, own]).to(device)  # ((1+2K)B,) into txt_tokens
        f_mask = self.mask[f_txt]
        width = int(f_mask.sum(1).max())  # padding is at the end: drop the columns no row uses
        f_tokens, f_mask = self.txt_tokens[f_txt, :width], f_mask[:, :width]
        cos = (self.img_emb[f_img] * self.txt_emb[f_txt]).sum(-1)  # ((1+2K)B,)
        extra = None
        neg = None if self.slots is None else text_negatives(
            self.slots, [self.texts[i] for i in rows.tolist()], self.bundle.tokenizer, self.cfg.seed, "rerank", step, self.cfg.negatives_per_text)
        if neg is not None:  # G more rows: image rows[g] against a negative of its own text
            at, n_ids, n_mask = (t.to(device) for t in neg)
            with torch.no_grad():  # the text tower is frozen here
                n_tokens = model.text_tokens(n_ids, n_mask)  # (G, L', D_t)
                n_emb = model.text_emb(n_tokens, n_mask).float()  # (G, E)
            L = max(width, n_tokens.shape[1])
            f_tokens, f_mask = pad_tokens(f_tokens, f_mask, L)
            n_tokens, n_mask = pad_tokens(n_tokens, n_mask, L)
            extra, n_img = at, rows.to(device)[at]  # (G,): the rows' own images
            f_img = torch.cat([f_img, n_img])
            f_tokens, f_mask = torch.cat([f_tokens, n_tokens]), torch.cat([f_mask, n_mask])
            cos = torch.cat([cos, (self.img_emb[n_img] * n_emb).sum(-1)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            used, where = torch.unique(f_img, return_inverse=True)  # distinct images: their keys/values once
            logits = model.fuse(self.img_tokens[used], f_tokens, f_mask, image_index=where).float()
        loss = itm_objective(logits, cos, self.scale, rows.shape[0], K, self.cfg.itm_rank_weight, extra_rows=extra)
        return {"loss": loss}, rows.shape[0]  # the loss is the ITM objective alone
