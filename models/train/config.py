"""Training settings: what the run shares (``TrainConfig``), then one small config per stage.

The defaults are ``make demo``'s settings; the README's model section has the measurements
behind them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


CALIBRATION_MIN, CALIBRATION_MAX = 50, 1000  # images held out for calibration


@dataclass(frozen=True)
class JointConfig:
    """The joint stage: both towers, the fusion layers and the heads, trained together on ITC +
    ITM with in-batch hard negatives (+ optionally image-conditioned MLM)."""

    pretrained_lr_scale: float = 0.1  # learning-rate multiplier of pretrained parts (a pretrained text tower; CLIP's towers)
    itm_weight: float = 1.0  # loss = itc + itm_weight * itm
    itm_negatives: int = 2  # hard negatives per image and per text (ALBEF: 1)
    hard_negative_ramp: int = 300  # steps over which negatives go from uniform to ITC-hard
    mlm_weight: float = 0.0  # image-conditioned masked language modelling (ALBEF); off by default
    mlm_prob: float = 0.15  # share of words hidden
    mine_batches: bool = True  # from epoch 1 on, batch each pair with its ITC nearest neighbour
    freeze_towers: bool = False  # train only the fusion layers and ITM head (towers, projections, temperature fixed)

    def __post_init__(self):
        if self.itm_negatives < 1 or self.mlm_weight < 0:
            raise ValueError("itm_negatives must be at least 1 and mlm_weight at least 0")
        if not 0 < self.mlm_prob < 1:
            raise ValueError(f"mlm_prob must be in (0, 1); got {self.mlm_prob}")


@dataclass(frozen=True)
class RerankConfig:
    """The reranker stage: the fusion layers and ITM head alone, towers frozen, on the
    candidates ITC itself retrieves for every training pair over the whole training set."""

    epochs: int = 8  # 0: no reranker stage
    lr_scale: float = 2.0  # its peak learning rate, x TrainConfig.lr
    pool: int = 32  # negatives come from each query's top `pool` ITC candidates
    negatives: int = 4  # drawn per query and direction, in proportion to softmax(ITC logits)
    share: float = 0.0  # of a `minutes` budget, kept for this stage (0: it gets what the joint stage leaves)

    def __post_init__(self):
        if self.epochs < 0 or self.pool < 2 or self.negatives < 1 or self.lr_scale <= 0:
            raise ValueError("rerank epochs must be >= 0, pool >= 2, negatives >= 1 and lr_scale > 0")
        if not 0 <= self.share < 1:
            raise ValueError(f"rerank share must be in [0, 1); got {self.share}")


@dataclass(frozen=True)
class TrainConfig:
    """What both stages share: the loop's schedule, optimizer, clipping, checkpoints, device."""

    epochs: int | None = 10  # joint-stage passes over the data (None: until the time budget runs out)
    minutes: float | None = None  # wall-clock budget for the whole run; stops at whichever of epochs/minutes ends first
    batch_size: int = 64  # pairs per step (also the pool in-batch hard negatives are drawn from)
    lr: float = 1e-3  # peak learning rate of the parts trained from scratch
    weight_decay: float = 0.05
    warmup_steps: int = 50  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.05  # cosine decays to this fraction of the peak
    grad_clip: float = 10.0  # max global gradient norm (1.0 starves ITM: its early norms are 20-100)
    itm_rank_weight: float = 1.0  # both stages' ITM objective: BCE + this x the listwise loss (0: ALBEF's BCE only)
    # both stages: one compositional negative of each caption (words of one slot swapped or
    # replaced; models/negatives.py), an extra wrong text for ITC (image -> text) and for ITM.
    # On by default: reranked R@1 38.8 -> 51.0 on the generalisation split, 97.0 on the demo
    # split (models/README.md, issue 21)
    text_negatives: bool = True
    negatives_per_text: int = 1  # with text_negatives: up to this many per caption, each of another slot
    # share of the training images held out of both stages to calibrate reranking's ITM weight
    # per depth (models/calibrate.py; at most CALIBRATION_MAX images; 0: no calibration, the
    # plain sum); skipped when that is fewer than CALIBRATION_MIN images
    calibration: float = 0.0
    checkpoint_every: int = 200  # steps between checkpoints (0: only at the end of the joint stage)
    keep_checkpoints: int = 2
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda[:n]
    progress: bool = True
    joint: JointConfig = field(default_factory=JointConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)

    def __post_init__(self):
        if self.epochs is None and self.minutes is None:
            raise ValueError("give epochs, minutes, or both")
        if self.itm_rank_weight < 0:
            raise ValueError("itm_rank_weight must be at least 0")
        if self.negatives_per_text < 1:
            raise ValueError(f"negatives_per_text must be at least 1; got {self.negatives_per_text}")
        if not 0 <= self.calibration < 0.5:
            raise ValueError(f"calibration must be in [0, 0.5); got {self.calibration}")
