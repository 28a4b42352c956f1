"""Where the hard examples come from: batches of look-alike pairs, and each pair's top ITC
candidates over the whole training set.

Both stages train ITM on negatives ITC finds hard. The joint stage draws them inside the
batch (``losses.sample_hard_negatives``), so it plans batches that hold each pair's nearest
neighbour (``batch_plan`` with ``nearest_text_neighbours``). The reranker stage draws them from
each query's top candidates over all pairs (``itc_candidates`` then ``sample_from_pool``), the
lists search itself will hand the reranker. Every similarity is streamed in chunks of queries:
memory is (chunk, n), never (n, n).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data import PairDataset
from ..factory import Bundle


def batch_plan(n: int, batch_size: int, seed: int, epoch: int, neighbour: list[int] | None = None) -> list[list[int]]:
    """An epoch's batches: a seeded permutation, the last short batch dropped when n > batch.

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


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in an epoch of n pairs (``batch_plan`` drops the short last one; a set
    smaller than a batch is one batch): what both stages and the demo's plan count."""
    return n // min(batch_size, n) if n else 0


def sims_without_self(queries: torch.Tensor, docs: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Cosines of ``chunk`` queries at a time against every document, (c, n) each, with query
    i's own document i (the two are sides of the same n pairs) set to -inf."""
    for i in range(0, queries.shape[0], chunk):
        sim = queries[i : i + chunk] @ docs.t()  # (c, n)
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + i] = float("-inf")
        yield sim


@torch.no_grad()
def nearest_text_neighbours(bundle: Bundle, dataset: PairDataset, device, chunk: int = 256) -> list[int]:
    """For every pair, the other pair whose text is closest in the current ITC space."""
    model = bundle.model
    was_training = model.training
    model.eval()
    texts = [dataset.text(i) for i in range(len(dataset))]
    embs = []
    for i in range(0, len(texts), chunk):
        ids, mask = bundle.tokenizer(texts[i : i + chunk])
        embs.append(model.encode_text(ids.to(device), mask.to(device)).float())
    emb = torch.cat(embs)  # (n, E)
    out = [j for sim in sims_without_self(emb, emb, chunk) for j in sim.argmax(dim=1).tolist()]
    model.train(was_training)
    return out


@torch.no_grad()
def itc_candidates(queries: torch.Tensor, docs: torch.Tensor, pool: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top ``pool`` documents by cosine. Queries and docs are the two sides of the
    same n pairs, so query i's own document i (its positive) is left out. -> (values, indices),
    each (n, pool)."""
    pool = min(pool, docs.shape[0] - 1)
    tops = [sim.topk(pool, dim=1) for sim in sims_without_self(queries, docs, chunk)]
    return torch.cat([v for v, _ in tops]), torch.cat([j for _, j in tops])


def sample_from_pool(values: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, scale: float, k: int, gen) -> torch.Tensor:
    """For each row r, k distinct candidates of ``index[r]`` drawn in proportion to
    softmax(scale x cosine): the ones ITC is likeliest to rank above the positive are trained on
    most, as ALBEF draws in-batch negatives. -> (len(rows), k) document indices."""
    w = (values[rows] * scale).float().softmax(dim=1) + 1e-9  # (b, pool)
    pick = torch.multinomial(w, min(k, w.shape[1]), generator=gen)  # (b, k), no repeats
    return index[rows].gather(1, pick)
