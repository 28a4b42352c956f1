"""The evaluation report as files: report.json, report.md and the recall / latency plots."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import LATENCY_KEYS, depth_key


def write_report(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]


def markdown(report: dict) -> str:
    gallery = ("the pairs' own images and captions" if report.get("gallery", "pairs") == "pairs"
               else f"the collection ({report['gallery_size']['t2i']} items with images"
               + (f", where {report['where']}" if report.get("where") else "") + ")")
    lines = [
        "# Reranking evaluation\n",
        f"{report['texts']} captions of {report['images']} images from `{report['pairs']}` ({report['rows']} rows read, "
        f"{len(report.get('skipped', []))} skipped); gallery: {gallery}; fusion `{report['fusion']}`.\n",
    ]
    for direction, title in (("t2i", "text → image"), ("i2t", "image → text")):
        lines += [f"\n## {title}\n", f"{report.get('evaluated', {}).get(direction, '')} queries.\n",
                  "| | R@1 | R@5 | R@10 | MRR | nDCG@10 | win/tie/loss vs ITC | p vs ITC (Holm) | mean ms | p95 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, m in report.get(direction, {}).items():
            lat = report.get(LATENCY_KEYS[direction], {}).get(key, {}).get("total", {})
            p = m.get("p_value_vs_itc")
            wtl = f"{m['wins']}/{m['ties']}/{m['losses']}" if "wins" in m else ""
            lines.append(
                f"| {key} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['MRR']:.3f} | {m['nDCG@10']:.3f} | {wtl} | "
                f"{'' if p is None else f'{p:.2g}'} | {lat.get('mean', float('nan')):.1f} | {lat.get('p95', float('nan')):.1f} |"
            )
        comps = report.get("comparisons", {}).get(direction, [])
        if comps:
            lines += ["\nPaired tests on per-query reciprocal rank (Holm-corrected over the sweep):\n",
                      "| | vs | win/tie/loss | mean ΔRR | randomization p | Holm | t-test p | Holm |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {c['a']} | {c['b']} | {c['wins']}/{c['ties']}/{c['losses']} | {c['mean_rr_difference']:+.4f} | "
                      f"{c['p_randomization']:.2g} | {c['p_randomization_holm']:.2g} | {c['p_t']:.2g} | {c['p_t_holm']:.2g} |" for c in comps]
    if report.get("skipped"):
        lines.append(f"\n{len(report['skipped'])} rows skipped (report.json lists each with its line and reason); first: "
                     + "; ".join(f"line {x['line']}: {x['reason']}" for x in report["skipped"][:3]) + ".\n")
    lines.append("\nLatency: `SearchEngine.search` calls on the collection (encode, filter, retrieve, rerank, metadata): "
                 "caption texts against images, and image files (decoded and encoded, as an upload) against texts.\n")
    for n in report.get("notes", []):
        lines.append(f"Note: {n}\n")
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = report["depths"]
    keys = [depth_key(d) for d in depths]

    def save(fig, ax, ylabel: str, name: str) -> Path:
        ax.set_xlabel("rerank depth (0 = ITC only)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        return out / name

    fig, ax = plt.subplots(figsize=(6, 4))
    for direction, style in (("t2i", "o-"), ("i2t", "s--")):
        if not report.get(direction):
            continue
        for k in ("R@1", "R@5"):
            ax.plot(depths, [report[direction][key][k] for key in keys], style, label=f"{direction} {k}")
    p1 = save(fig, ax, "recall (%)", "recall_vs_depth.png")
    lat, lat_i2t = report[LATENCY_KEYS["t2i"]], report.get(LATENCY_KEYS["i2t"], {})
    if not lat:  # latency not measured (--latency-queries 0)
        return [p1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in ("total", "rerank", "retrieve", "encode"):
        ax.plot(depths, [lat[key][stage]["mean"] for key in keys], "o-", label=f"t2i {stage} (mean)")
    ax.plot(depths, [lat[key]["total"]["p95"] for key in keys], "k:", label="t2i total (p95)")
    if lat_i2t:
        ax.plot(depths, [lat_i2t[key]["total"]["mean"] for key in keys], "s--", label="i2t total (mean)")
    return [p1, save(fig, ax, "ms per query", "latency_vs_depth.png")]
