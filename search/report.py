"""The evaluation report: what ``vtfusion eval`` measured (``EvalReport``), and its files:
report.json, report.md and the recall / latency plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

LATENCY_KEYS = {"t2i": "latency_ms", "i2t": "latency_ms_i2t"}  # report.json keys of each direction's timings


def depth_key(depth: int) -> str:
    """A report's key for a rerank depth: ``itc`` (0, ITC only) or ``rerank@<depth>``."""
    return "itc" if depth == 0 else f"rerank@{depth}"


def key_depth(key: str) -> int:
    """The inverse of :func:`depth_key`."""
    return 0 if key == "itc" else int(key.split("@", 1)[1])


@dataclass
class EvalReport:
    """One evaluation; ``to_dict()`` is report.json. Per direction (``t2i``, ``i2t``), per
    stage (``depth_key``): R@1, R@5, R@10, MRR, nDCG@10 and, for reranked stages, the
    Holm-corrected randomization ``p_value_vs_itc`` with ``wins`` / ``ties`` / ``losses``."""

    pairs: str  # the pairs file
    gallery: str  # "pairs" | "collection"
    where: str | None  # the collection gallery's filter
    rows: int  # rows read from the pairs file
    images: int  # distinct images (by bytes) evaluated
    texts: int  # captions evaluated: the text -> image queries
    reused_images: int  # images whose stored vector and token record were used
    depths: list[int]
    fusion: str
    itc_scale: float
    notes: list[str]
    skipped: list[dict]  # {"row", "line", "image", "caption", "reason"} per row not evaluated
    evaluated: dict[str, int]  # queries per direction
    gallery_size: dict[str, int]  # gallery items per direction
    comparisons: dict[str, list[dict]]  # per direction: paired tests between stages (see compare_depths)
    t2i: dict[str, dict[str, float]] = field(default_factory=dict)
    i2t: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)  # text -> image searches: stage -> {"mean", "p95"} per depth
    latency_ms_i2t: dict = field(default_factory=dict)  # image -> text searches
    trec: dict | None = None  # run files written: {"run_depth", "files", "first_relevant_beyond_run"}
    itm_weights: dict = field(default_factory=dict)  # stage -> the ITM logit's weight in itm+itc (the model's calibration)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["trec"] is None:
            del d["trec"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """A report.json read back; ValueError when it is not one."""
        if not isinstance(d, dict) or "t2i" not in d:
            raise ValueError("not a vtfusion report.json (no 't2i' section)")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ValueError(f"not a vtfusion report.json of this version ({e})") from None


def write_report(report: EvalReport | dict, out: str | Path) -> list[Path]:
    report = report.to_dict() if isinstance(report, EvalReport) else report
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
