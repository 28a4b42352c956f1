"""The training objectives: ITC (symmetric InfoNCE), ITM with hard negatives (ALBEF's binary
loss plus a listwise loss on the score search ranks by), and image-conditioned masked
language modelling with its prediction head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import fused_score


def itc_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, extra_text_emb: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E), (B, E) unit vectors -> (loss, sim (B, B) image x text cosine).

    ``extra_text_emb`` (G, E): texts that match no image of the batch (compositional negatives
    made from the batch's captions) are extra wrong answers for every image, as NegCLIP adds
    its negative captions to the image -> text softmax; text -> image is unchanged."""
    sim = image_emb @ text_emb.t()  # (B, B)
    logits = logit_scale * sim
    target = torch.arange(sim.shape[0], device=sim.device)
    i2t = logits if extra_text_emb is None else torch.cat([logits, logit_scale * (image_emb @ extra_text_emb.t())], dim=1)  # (B, B [+ G])
    loss = (F.cross_entropy(i2t, target) + F.cross_entropy(logits.t(), target)) / 2
    return loss, sim


def sample_hard_negatives(
    logits: torch.Tensor, generator: torch.Generator | None = None, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text, and for each text a negative image, drawn in proportion
    to softmax(ITC logits) over the other items of the batch (never the positive), as ALBEF
    does: the more similar a wrong pair looks to ITC, the likelier ITM is trained on it.

    logits (B, B) image x text, scaled by the ITC temperature -> (text index per image (B,),
    image index per text (B,)); with ``k`` > 1, k distinct negatives each: (B, k) and (B, k).
    """
    sim = logits
    B = sim.shape[0]
    if B < 2:
        raise ValueError("hard-negative mining needs a batch of at least 2 pairs")
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    with torch.no_grad():
        w_i2t = sim.float().softmax(dim=1).masked_fill(eye, 0.0) + 1e-9 * (~eye)  # (B, B) rows: images
        w_t2i = sim.float().t().softmax(dim=1).masked_fill(eye, 0.0) + 1e-9 * (~eye)  # (B, B) rows: texts
        gen_device = generator.device if generator is not None else sim.device
        k = min(k, B - 1)
        neg_text = torch.multinomial(w_i2t.to(gen_device), k, generator=generator)  # (B, k), no repeats
        neg_image = torch.multinomial(w_t2i.to(gen_device), k, generator=generator)
        if k == 1:
            neg_text, neg_image = neg_text.squeeze(1), neg_image.squeeze(1)
    return neg_text.to(sim.device), neg_image.to(sim.device)


def itm_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over matched (label 1) and mismatched (label 0) pair logits.

    Positives are weighted so they carry a third of the loss whatever the number of negatives
    (ALBEF's one positive for two negatives), keeping the logit's calibration comparable.
    """
    logits = torch.cat([pos_logits, neg_logits]).float()
    labels = torch.cat([torch.ones_like(pos_logits), torch.zeros_like(neg_logits)]).float()
    w_pos = neg_logits.numel() / (2.0 * pos_logits.numel())  # 1.0 with one negative each way
    weights = torch.cat([torch.full_like(pos_logits, w_pos), torch.ones_like(neg_logits)]).float()
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights, reduction="sum") / weights.sum()


def itm_rank_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Listwise ITM loss: each query's positive against its own hard negatives.

    pos_logits (B,), neg_logits (B, K): for query i the ITM logits of its matching partner and of
    K mismatched partners mined from ITC. Cross-entropy over the K + 1 (positive first), so
    the head learns to *order* a query's candidates, which is what reranking asks of it.
    """
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1).float()  # (B, 1 + K)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


IGNORE = -100  # label of positions masked language modelling does not predict


def mask_tokens(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, as ALBEF's image-conditioned MLM uses it: each ordinary token (``special``
    (B, L) False: not padding, [CLS] or [SEP]) is chosen with probability ``prob``; a chosen
    token becomes [MASK] 80 % of the time, a random token 10 %, itself 10 %.

    -> (masked ids (B, L), labels (B, L): the original id where chosen, ``IGNORE`` elsewhere).
    Draws come from ``generator`` on the CPU, so a seeded run masks the same tokens every time.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(ids.shape, generator=generator, device=gen_device).to(ids.device)  # (B, L)
    how = torch.rand(ids.shape, generator=generator, device=gen_device).to(ids.device)
    rand_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=gen_device).to(ids.device)
    chosen = (u < prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    out = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (how >= 0.8) & (how < 0.9), rand_ids, out)
    return out, labels


def itm_objective(
    logits: torch.Tensor, cos: torch.Tensor | None, scale, B: int, K: int, rank_weight: float,
    extra_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ITM loss both training stages use, over (1 + 2K)B fusion rows laid out as B
    positives, then each image against its K negative texts, then each text against its K
    negative images: ALBEF's binary loss, plus (``rank_weight``) the listwise loss ranking each
    query's positive above its own negatives by what search ranks them by (``fused_score``).
    ``cos``: each row's ITC cosine, held fixed, so ITM learns what ITC gets wrong rather than
    relearning it (unused, may be None, when ``rank_weight`` is 0).

    ``extra_rows`` (G,): G more rows at the end, each image ``extra_rows[g]`` against a
    compositional negative of its own text (an image may have several); in the listwise loss
    each is one more negative text of that image (images with fewer leave their slots empty)."""
    loss = itm_loss(logits[:B], logits[B:])
    if rank_weight:
        fused = fused_score(logits.float(), cos, scale)  # ((1+2K)B [+ G],)
        pos, neg_t, neg_i = fused[:B], fused[B : B + B * K].view(B, K), fused[B + B * K : B + 2 * B * K].view(B, K)
        if extra_rows is not None and extra_rows.numel():
            # a row's J-th compositional negative goes to column J: its ordinal among its image's
            order, at = torch.sort(extra_rows, stable=True)
            col = torch.empty_like(extra_rows)
            col[at] = torch.arange(order.numel(), device=order.device) - torch.searchsorted(order, order)
            extra = torch.full((B, int(col.max()) + 1), float("-inf"), dtype=fused.dtype, device=fused.device)
            extra = extra.index_put((extra_rows, col), fused[B + 2 * B * K :])  # (B, J)
            neg_t = torch.cat([neg_t, extra], dim=1)  # (B, K + J): exp(-inf) adds nothing where there is none
        loss = loss + rank_weight * (itm_rank_loss(pos, neg_t) + itm_rank_loss(pos, neg_i)) / 2
    return loss


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
