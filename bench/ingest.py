"""Ingest throughput: end-to-end images/s against model-forward-only images/s, same batches, same run.

    .venv/bin/python bench/ingest.py [--n 1000] [--model MODEL_DIR] [--workers W] [--batch-size B] [--jpeg SIDE]

The forward-only baseline runs exactly the model work ingest does per batch (image tokens,
image embedding, text embedding) on images decoded beforehand; end-to-end is ``ingest`` into
a fresh SQLite collection (read, decode, hash, dedup, embed, token cache, SQL, FAISS). The
ratio end-to-end / forward-only is what the pipeline overhead costs (goal >= 0.9).

On a CPU, ingest embeds in worker processes, one torch thread each (data parallel), so the
forward-only baseline is measured both ways: in the main process on all torch threads, and
in the same number of forked one-thread workers (fork included, as ingest pays it). The
ratio is taken against the FASTER of the two: a pipeline that merely wins back the main
process's idle intra-op threads does not get to count that as hidden overhead.

``--jpeg SIDE`` re-saves the demo images as SIDE-pixel JPEGs, as product photos come; a
second table then compares decoding each file in full with decoding it at reduced scale
(``ImageTransform.load``: libjpeg's DCT scaling down to no less than the model's side), both
followed by the model's resize, in the same run.
Not a test: it prints a table; these machines are noisy, so compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common import demo_catalog  # also puts the repository on sys.path

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import default_workers, embeds_in_workers, ingest, item_text
from vtfusion.models import factory
from vtfusion.models.preprocess import DEFAULT_MAX_PIXELS, load_image


@torch.no_grad()
def _forward(bundle, pixels_u8: torch.Tensor, texts: list[str]):
    """The model work ingest does for one batch -> (image emb, text emb, image tokens) on the CPU."""
    model, device = bundle.model, bundle.device
    px = bundle.transform.normalize(pixels_u8.to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tok = model.image_tokens(px)
        ids, mask = bundle.tokenizer(texts)
        return model.image_emb(tok).float().cpu(), model.encode_text(ids.to(device), mask.to(device)).float().cpu(), tok.float().cpu()


def forward_only(bundle, pixels_u8: torch.Tensor, texts: list[str], batch_size: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        _forward(bundle, pixels_u8[i : i + batch_size], texts[i : i + batch_size])
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - t)


class _ForwardBatches(Dataset):
    """Batch k of pre-decoded images -> the forward's outputs, in a worker process."""

    def __init__(self, bundle, pixels_u8, texts, batch_size):
        self.bundle, self.pixels, self.texts, self.bs = bundle, pixels_u8, texts, batch_size

    def __len__(self):
        return -(-len(self.texts) // self.bs)

    def __getitem__(self, k):
        sl = slice(k * self.bs, (k + 1) * self.bs)
        image_emb, text_emb, tok = _forward(self.bundle, self.pixels[sl], self.texts[sl])
        return image_emb, text_emb, tok.half()  # fp16 tokens cross the process boundary, as ingest's records do


def forward_only_workers(bundle, pixels_u8: torch.Tensor, texts: list[str], batch_size: int, workers: int) -> float:
    """The same model work in ``workers`` forked one-thread processes (as CPU ingest runs it)."""
    t = time.perf_counter()
    loader = DataLoader(_ForwardBatches(bundle, pixels_u8, texts, batch_size), batch_size=None, num_workers=workers,
                        collate_fn=lambda x: x, multiprocessing_context="fork")
    for _ in loader:
        pass
    return len(texts) / (time.perf_counter() - t)


def decode_ms(rows, transform, draft: bool) -> float:
    """ms per image: file -> uint8 (3, S, S), decoded in full or at reduced scale."""
    t = time.perf_counter()
    for r in rows:
        transform(transform.load(r.image) if draft else load_image(r.image))
    return 1000 * (time.perf_counter() - t) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="demo catalog size")
    ap.add_argument("--model", type=Path, help="model folder (default: an untrained default-size model)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternating forward-only / end-to-end rounds; medians reported")
    ap.add_argument("--jpeg", type=int, default=0, metavar="SIDE", help="re-save the images as SIDE-pixel JPEGs (0: the demo's PNGs)")
    ap.add_argument("--full-decode", action="store_true", help="baseline: ingest decodes every JPEG in full, as before reduced-scale decoding")
    args = ap.parse_args()
    if args.full_decode:
        from vtfusion.models.preprocess import ImageTransform

        ImageTransform.load = lambda self, path, max_pixels=DEFAULT_MAX_PIXELS, name=None: load_image(path, max_pixels, name)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, catalog, args.model = demo_catalog(tmp, args.n, args.model, jpeg_side=args.jpeg)
        bundle = factory.load(args.model, device=factory.resolve_device("auto"))
        decodes = []
        if args.jpeg and not args.full_decode:
            sample = rows[: min(len(rows), 300)]
            decode_ms(sample[:20], bundle.transform, True)  # warm-up
            for _ in range(args.repeats):
                decodes.append((decode_ms(sample, bundle.transform, False), decode_ms(sample, bundle.transform, True)))
        pixels = torch.stack([bundle.transform(bundle.transform.load(r.image)) for r in rows])
        texts = [item_text(r) for r in rows]
        forward_only(bundle, pixels[: args.batch_size], texts[: args.batch_size], args.batch_size)  # warm-up
        workers = default_workers(bundle.device) if args.workers is None else args.workers
        parallel = embeds_in_workers(bundle.device, workers)
        fwds, fwds_main, fwds_par, e2es, reps = [], [], [], [], []
        for r in range(args.repeats):  # alternated, so a noisy spell hits both sides
            fwd = forward_only(bundle, pixels, texts, args.batch_size)
            fwds_main.append(fwd)
            if parallel:
                fwds_par.append(forward_only_workers(bundle, pixels, texts, args.batch_size, workers))
                fwd = max(fwd, fwds_par[-1])
            fwds.append(fwd)
            c = Collection.init(tmp / f"col{r}", args.model)
            rep = ingest(c, catalog, batch_size=args.batch_size, workers=workers, progress=False)
            e2es.append(rep.added / rep.seconds)
            reps.append(rep)
    ratios = [e / f for e, f in zip(e2es, fwds)]
    best = reps[int(np.argsort(ratios)[len(ratios) // 2])]  # the median run's stages

    mode = f"{workers} decode+embed workers" if parallel else f"{workers} decode workers"
    print(f"items {len(rows)}  batch {args.batch_size}  {mode}  device {bundle.device}  repeats {args.repeats}"
          f"  images {'%d px JPEG' % args.jpeg if args.jpeg else 'demo PNG'}")
    if decodes:
        full, draft = np.median([d[0] for d in decodes]), np.median([d[1] for d in decodes])
        print(f"{'decode + resize (median)':<28}{'ms/image':>10}")
        print(f"{'full decode':<28}{full:>10.2f}")
        print(f"{'reduced-scale decode':<28}{draft:>10.2f}   speed-up {full / draft:.1f}x")
    print(f"{'stage (median run)':<20}{'seconds':>10}")
    for k, v in best.stages.items():
        print(f"{k:<20}{v:>10.2f}")
    if parallel:
        print(f"{'forward only, main process':<28}{np.median(fwds_main):>10.1f} images/s (median, {torch.get_num_threads()} threads)")
        print(f"{'forward only, %d workers' % workers:<28}{np.median(fwds_par):>10.1f} images/s (median, 1 thread each)")
    print(f"{'model forward only':<28}{np.median(fwds):>10.1f} images/s (median{', the faster of the two' if parallel else ''})")
    print(f"{'end-to-end ingest':<28}{np.median(e2es):>10.1f} images/s (median)")
    print(f"{'ratio (goal >= 0.9)':<28}{np.median(ratios):>10.2f}  (per repeat: {', '.join(f'{x:.2f}' for x in ratios)})")

if __name__ == "__main__":
    main()
