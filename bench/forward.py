"""Model forward throughput (torch only: runs where faiss / SQL are not installed), against the
device's bf16 matrix-product ceiling.

    python bench/forward.py [--batch 256] [--steps 20] [--compile] [--ceiling-tflops 790]

Times what ingest runs per batch (image tokens -> image embedding, text embedding) and what
reranking runs (ITM over a query text and 256 candidates' tokens) for the default model, in
bf16 autocast with channels-last on CUDA (fp32 on CPU). FLOPs per call are counted by
torch.utils.flop_counter on the real call; achieved TFLOP/s / ceiling is the utilisation.
``--compile`` wraps the towers in torch.compile and falls back to eager if compiling fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtfusion.models import factory  # noqa: E402


def timed(fn, steps: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ceiling-tflops", type=float, default=790.0, help="bf16 dense matmul ceiling of the device")
    ap.add_argument("--model", type=Path, help="model folder (default: an untrained default-size model)")
    args = ap.parse_args()
    device = factory.resolve_device("auto")
    texts = [f"a {c} {p} {o} to the left of a small {c2} plain bag" for c, p, o, c2 in
             zip(["red", "blue", "green", "black"] * 64, ["striped", "dotted", "plain", "checkered"] * 64,
                 ["mug", "hat", "sneaker", "lamp"] * 64, ["yellow", "white", "pink", "grey"] * 64)]
    b = factory.load(args.model, device) if args.model else factory.build_scratch(texts)
    model = b.model.to(device).eval()
    if device.type == "cuda":
        model.vision.to(memory_format=torch.channels_last)
    s = b.transform.size
    px = torch.randint(0, 255, (args.batch, 3, s, s), dtype=torch.uint8)
    ids, mask = b.tokenizer((texts * (args.batch // len(texts) + 1))[: args.batch])
    if device.type == "cuda":
        px = px.pin_memory()
    ids, mask = ids.to(device), mask.to(device)
    if args.compile:
        try:
            model.vision = torch.compile(model.vision)
            model.fuse = torch.compile(model.fuse)
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable ({type(e).__name__}: {e}); eager")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def ingest_step():
        x = b.transform.normalize(px.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**amp):
            tok = model.image_tokens(x)
            model.image_emb(tok)
            model.encode_text(ids, mask)

    with torch.no_grad(), torch.autocast(**amp):
        cand = model.image_tokens(b.transform.normalize(px[: min(args.batch, args.depth)].to(device))).repeat(
            -(-args.depth // min(args.batch, args.depth)), 1, 1)[: args.depth]
    q_ids, q_mask = ids[:1], mask[:1]

    @torch.no_grad()
    def rerank_step():
        with torch.autocast(**amp):
            for c in range(0, args.depth, 64):
                model.itm_logits(cand[c : c + 64], q_ids, q_mask)

    try:
        sec = timed(ingest_step, args.steps, device)
    except Exception as e:  # noqa: BLE001 - a failed compile shows up at the first call
        if not args.compile:
            raise
        print(f"compiled model failed ({type(e).__name__}); eager")
        model.vision, model.fuse = model.vision._orig_mod, model.fuse._orig_mod
        sec = timed(ingest_step, args.steps, device)
    f_ingest = flops(ingest_step)
    sec_r = timed(rerank_step, args.steps, device)
    f_rerank = flops(rerank_step)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch}, image {s}px, compile {args.compile}")
    for what, sec_, fl, n, unit in (("ingest forward", sec, f_ingest, args.batch, "images/s"), (f"ITM rerank@{args.depth}", sec_r, f_rerank, args.depth, "pairs/s")):
        tf = fl / sec_ / 1e12
        util = f"{100 * tf / args.ceiling_tflops:.2f} % of {args.ceiling_tflops:.0f} TFLOP/s" if device.type == "cuda" else "(no GPU ceiling)"
        print(f"{what:<18} {n / sec_:>12,.0f} {unit:<9} {1e3 * sec_:8.2f} ms/call  {fl / 1e9:8.2f} GFLOP/call  {tf:8.3f} TFLOP/s  {util}")


if __name__ == "__main__":
    main()
