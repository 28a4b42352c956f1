"""The ``vtfusion`` command line: thin wrappers over the library functions.

Every command here is documented in the README (``tests/test_cli.py`` fails otherwise).
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # typer 0.2x runs on its own copy of click
    from typer._click import exceptions as click_exc
    from typer._click.core import Context
except ImportError:  # pragma: no cover - typer on the click package
    from click import Context
    from click import exceptions as click_exc

log = logging.getLogger("vtfusion")
GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet", "--debug")  # accepted before or after the command
_debug = False  # --debug: show the traceback of an unexpected error


class _Group(TyperGroup):
    """Global flags anywhere on the line (``vtfusion stats col -q`` = ``vtfusion -q stats col``);
    an unexpected error is one line on stderr and exit 1, its traceback only with ``--debug``."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._globals_first(ctx, list(args)))

    def _globals_first(self, ctx: Context, args: list[str]) -> list[str]:
        at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        cmd = self.get_command(ctx, args[at]) if at is not None else None
        if cmd is None:
            return args
        takes_value = {
            o for p in cmd.params if p.param_type_name == "option" and not getattr(p, "is_flag", False)
            and not getattr(p, "count", False) for o in p.opts + p.secondary_opts
        }
        moved, rest, i = [], args[: at + 1], at + 1
        while i < len(args):
            a = args[i]
            if a == "--":
                rest += args[i:]
                break
            if a in GLOBAL_FLAGS:
                moved.append(a)
            else:
                rest.append(a)
                if a in takes_value and i + 1 < len(args):  # the option's value, whatever it looks like
                    rest.append(args[i + 1])
                    i += 1
            i += 1
        return moved + rest

    def invoke(self, ctx: Context):
        try:
            return super().invoke(ctx)
        except (click_exc.ClickException, typer.Exit, typer.Abort):  # usage errors and our own exits
            raise
        except BrokenPipeError:  # `vtfusion ... | head`: the reader left; say nothing more
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence between a user and a traceback
            if _debug:
                raise
            msg = _safe(str(e) or type(e).__name__)
            typer.secho(f"error: {msg} ({type(e).__name__}; run again with --debug for the traceback)", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="vtfusion",
    help="Vision-text search: fusion model, FAISS indexes over SQL metadata, cross-attention reranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help and usage errors: unwrapped, greppable, and no rich import at start
    cls=_Group,
)


# fixed choices, shown in --help and rejected with the list (the library's tuples are the same:
# tests/test_cli.py checks; they are not imported here, so --help never loads torch)
class Target(str, Enum):
    image = "image"
    text = "text"


class Fusion(str, Enum):
    itm_itc = "itm+itc"
    itm = "itm"
    itc = "itc"


class ImageTower(str, Enum):
    small = "small"
    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"
    resnet101 = "resnet101"


class FusionMode(str, Enum):
    text = "text"
    mutual = "mutual"


class Gallery(str, Enum):
    pairs = "pairs"
    collection = "collection"


class TokenDtype(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    int8 = "int8"
    none = "none"


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


def _text_tower(value: str) -> str:
    if value not in ("scratch", "minilm", "gru", "lstm") and not Path(value).is_dir():
        raise typer.BadParameter(f"{value!r} is not one of scratch, minilm, gru, lstm, or a local BERT folder")
    return value


DeviceOpt = Annotated[str, typer.Option("--device", metavar="[auto|cpu|cuda|cuda:N|mps]", callback=_device, help="Where the model runs.")]
TextTowerOpt = Annotated[str, typer.Option("--text-tower", metavar="[scratch|minilm|gru|lstm|FOLDER]", callback=_text_tower,
                                            help="scratch: a small BERT and WordPiece trained on the catalog's text (what make demo uses); "
                                                 "minilm: the pretrained all-MiniLM-L6-v2 (about 3x slower per step, a 422 MB model folder); "
                                                 "gru / lstm: a bidirectional recurrent layer, then self-attention, on that WordPiece vocabulary; "
                                                 "or a local BERT folder.")]


def _version(value: bool) -> None:
    if value:
        import vtfusion

        typer.echo(f"vtfusion {vtfusion.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging (before or after the command).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only (before or after the command).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "alembic", "faiss"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# control characters (C0, DEL, C1) as visible escapes: catalog text never drives the terminal
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


def _safe(text) -> str:
    """``text`` for a terminal: escape codes, bells, carriage returns and newlines made visible."""
    return str(text).translate(_CONTROL)


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {_safe(msg)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _usage(msg: str) -> None:
    """A command line that cannot be run as given: exit 2, like the parser's own errors."""
    raise click_exc.UsageError(msg)


def _json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))


def _table(columns: list[tuple[str, str]], rows: list[list], header: bool = True) -> None:
    """A plain table (rich; no colour, no markup: catalog text is printed as text, escaped)."""
    import sys

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD if header else None, show_header=header, show_edge=False, pad_edge=False, highlight=False)
    for name, justify in columns:
        t.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        t.add_row(*[Text(_safe(c)) for c in row])
    tty = sys.stdout.isatty()
    Console(file=sys.stdout, width=None if tty else 240, highlight=False, soft_wrap=False, color_system="auto" if tty else None).print(t)


def _shown_path(path: str) -> str:
    """An image path as a user would type it: relative to the working folder when inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


@app.command("demo-catalog")
def demo_catalog(
    out: Annotated[Path, typer.Argument(help="Folder to write images/, train.csv and test.csv into.")],
    n: Annotated[int, typer.Option("--n", help="Number of items.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives identical files.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Rendered image side in pixels.")] = 128,
    test_frac: Annotated[float, typer.Option("--test-frac", help="Share of item groups held out in test.csv.")] = 0.2,
    train_twins: Annotated[bool, typer.Option("--train-twins/--no-train-twins", help="Keep attribute-swapped twin pairs in the training split (--no-train-twins keeps one item of each).")] = True,
    test_twins_only: Annotated[bool, typer.Option("--test-twins-only", help="Only twin pairs in the test split: every test item has a twin.")] = False,
    held_out_phrasings: Annotated[bool, typer.Option("--held-out-phrasings", help="Test captions use phrasings the training captions never use.")] = False,
    held_out_combos: Annotated[float, typer.Option("--held-out-combos", help="Share of (colour, category) combinations that appear in the test split only.")] = 0.0,
    generalisation: Annotated[bool, typer.Option("--generalisation", help="All four: --no-train-twins --test-twins-only --held-out-phrasings --held-out-combos 0.125.")] = False,
) -> None:
    """Generate the synthetic product catalog (attribute-bound captions, attribute-swapped twins)."""
    from vtfusion.catalogs.demo import generate

    if generalisation:
        train_twins, test_twins_only, held_out_phrasings, held_out_combos = False, True, True, held_out_combos or 0.125
    try:
        counts = generate(out, n=n, seed=seed, image_size=image_size, test_frac=test_frac, train_twins=train_twins,
                          test_twins_only=test_twins_only, held_out_phrasings=held_out_phrasings,
                          held_out_combo_share=held_out_combos)
    except ValueError as e:
        _fail(str(e))
    _print_catalog(out, counts)


def _print_catalog(out: Path, counts: dict) -> None:
    typer.echo(
        f"wrote {counts['items']} items to {out}: {counts['train']} in train.csv, {counts['test']} in test.csv, "
        f"{counts['items_with_twin']} with an attribute-swapped twin"
    )
    if "held_out_combos" in counts:
        combos = ", ".join(counts["held_out_combos"]) or "none"
        typer.echo(f"generalisation split (split.json): combinations in the test split only: {combos}")


def _print_validation(v) -> None:
    typer.echo(f"held-out text->image over {v.n} pairs")
    typer.echo(f"  {'R@1 ITC only':<34}{100 * v.itc_r1:6.1f}")
    typer.echo(f"  {f'R@1 ITM rerank of top {v.rerank_k}':<34}{100 * v.itm_r1:6.1f}")
    typer.echo(f"  {f'R@1 ITM+ITC rerank of top {v.rerank_k}':<34}{100 * v.fused_r1:6.1f}")
    typer.echo(f"  {f'R@{v.rerank_k} ITC (rerank ceiling)':<34}{100 * v.itc_recall_at_k:6.1f}")


def rerank_epochs_for(epochs: int | None) -> int:
    """The reranker stage's default length: half the joint stage's (16 -> 8, make demo's), 8 under a time budget alone."""
    return 8 if epochs is None else (epochs + 1) // 2


@app.command("train")
def train_cmd(
    catalog: Annotated[Path, typer.Argument(metavar="CATALOG", help="Training pairs: a .csv, .jsonl or .parquet catalog (gzipped too; image paths relative to it), or a folder of images (text from sidecar files).")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (checkpoints go under OUT/checkpoints).")],
    val: Annotated[Path | None, typer.Option("--val", help="Held-out CSV for the final validation.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data (default 10 if --minutes is not given).")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Wall-clock budget; the LR schedule follows it; --rerank-share of it is kept for the second stage.")] = None,
    text_tower: TextTowerOpt = "scratch",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (a pretrained text tower gets 0.1x).")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Model input side in pixels (new models only).")] = 64,
    text_col: Annotated[list[str] | None, typer.Option("--text-col", help="Text column(s) to train on, one drawn per epoch (default: those of title, caption, text, description present).")] = None,
    val_text_col: Annotated[str, typer.Option("--val-text-col", help="Text column used as the validation query.")] = "caption",
    id_col: Annotated[str, typer.Option("--id-col")] = "id",
    image_col: Annotated[str, typer.Option("--image-col")] = "image",
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints (0: end only).")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint under --out.")] = False,
    itm_negatives: Annotated[int, typer.Option("--itm-negatives", help="Hard negatives per image and per text for ITM.")] = 2,
    itm_rank_weight: Annotated[float, typer.Option("--itm-rank-weight", help="Weight of the listwise ITM loss (0: ALBEF's binary ITM loss only).")] = 1.0,
    mlm_weight: Annotated[float, typer.Option("--mlm-weight", help="Weight of image-conditioned masked language modelling (ALBEF; default 0: off).")] = 0.0,
    rerank_epochs: Annotated[int | None, typer.Option("--rerank-epochs", help="Second stage: epochs of the fusion layers alone, towers frozen, on the candidates ITC retrieves for each training pair (0: none; default: half of --epochs, rounded up, or 8 with --minutes alone).")] = None,
    rerank_share: Annotated[float, typer.Option("--rerank-share", help="With --minutes: the share of the budget kept for the second stage (default 0: it gets only what the joint stage leaves).")] = 0.0,
    init_from: Annotated[str | None, typer.Option("--init-from", help="Start from clip:<CLIP id or folder> (train fusion layers on its towers) or a vtfusion model folder (fine-tune).")] = None,
    freeze_towers: Annotated[bool, typer.Option("--freeze-towers", help="Train only the fusion layers and ITM head.")] = False,
    image_tower: Annotated[ImageTower, typer.Option("--image-tower", help="The CNN of a new model: small (3 stages, what make demo uses) or torchvision's ResNet-18/34/50/101 (no classifier).")] = ImageTower.small,
    image_weights: Annotated[Path | None, typer.Option("--image-weights", help="torchvision-format weights for --image-tower resnet* (.pth read with weights_only=True, or .safetensors); that CNN trains at 0.1x the learning rate.")] = None,
    fusion: Annotated[FusionMode, typer.Option("--fusion", help="Fusion layers of a new model: text (text attends to the image, ALBEF/BLIP) or mutual (the design's two-way attention: image tokens attend to the text too).")] = FusionMode.text,
    text_negatives: Annotated[bool, typer.Option("--text-negatives/--no-text-negatives", help="Train ITC and ITM on compositional negatives made from each caption (words of one slot, learned from the catalog, swapped or replaced; default on).")] = True,
    calibration: Annotated[float, typer.Option("--calibration", help="Share of the training images held out of training to choose reranking's ITM weight per depth, so that reranking keeps ITC's R@5 and R@10 (0: no calibration, the plain sum).")] = 0.0,
    negatives_per_text: Annotated[int, typer.Option("--negatives-per-text", min=1, help="With --text-negatives: up to this many compositional negatives per caption and step, each changing another slot (colour, size, position, ...).")] = 1,
) -> None:
    """Train the fusion model (ITC + ITM with hard negatives, then the reranker stage) on a catalog, then validate."""
    from vtfusion.catalogs.sources import CatalogError
    from vtfusion.workflows.train import train_catalog
    from vtfusion.models.config import FusionConfig, VisionConfig
    from vtfusion.models.train import JointConfig, RerankConfig, TrainConfig

    if epochs is None and minutes is None:
        epochs = 10
    if rerank_epochs is None:
        rerank_epochs = rerank_epochs_for(epochs)
    try:
        cfg = TrainConfig(
            epochs=epochs, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed, workers=workers,
            device=device, checkpoint_every=checkpoint_every, itm_rank_weight=itm_rank_weight, text_negatives=text_negatives,
            calibration=calibration, negatives_per_text=negatives_per_text,
            joint=JointConfig(itm_negatives=itm_negatives, freeze_towers=freeze_towers, mlm_weight=mlm_weight),
            rerank=RerankConfig(epochs=rerank_epochs, share=rerank_share),
        )
        if image_weights is not None and image_tower is ImageTower.small:
            raise ValueError("--image-weights needs --image-tower resnet18|resnet34|resnet50|resnet101 (torchvision's architectures)")
        vision = (VisionConfig(image_size=image_size) if image_tower is ImageTower.small
                  else VisionConfig.resnet(image_tower.value, image_size=image_size))
        fusion_cfg = FusionConfig(mode=fusion.value)
    except ValueError as e:  # settings that cannot go together
        _usage(str(e))
    try:
        report = train_catalog(
            catalog, out, cfg, val_csv=val, text_tower=text_tower, text_cols=text_col, val_text_col=val_text_col,
            id_col=id_col, image_col=image_col, vision=vision, resume=resume, init_from=init_from, image_weights=image_weights,
            fusion=fusion_cfg,
        )
    except (CatalogError, ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    _print_train(report)


def _print_plan(p: dict) -> None:
    typer.echo(
        f"plan: train {p['joint_steps']} joint + {p['rerank_steps']} reranker steps on {p['train_pairs']} pairs"
        + (f" (at most {p['minutes']:g} minutes)" if p["minutes"] else "")
        + f", index {p['train_pairs']} images, evaluate {p['test_pairs']} held-out pairs; each stage's progress "
        "bar shows its time left"
    )


def _print_train(report) -> None:
    r = report.result
    typer.echo(
        f"trained {r.steps} steps ({r.epochs_done:.1f} epochs over {report.train_pairs} pairs) in {r.seconds:.0f} s "
        f"(stopped by {r.stopped_by})"
        + (f", then {r.rerank_steps} reranker steps on ITC's own candidates in {r.rerank_seconds:.0f} s" if r.rerank_steps else "")
        + f"; model in {report.model_dir}"
    )
    if r.calibration:
        weights = ", ".join(f"@{d} {w:g}" for d, w in r.calibration["weights"].items())
        typer.echo(f"reranking calibrated on {r.calibration['pairs']} held-out pairs: ITM weight {weights} "
                   f"(the largest weight up to 1 that keeps ITC's R@1, R@5 and R@10 there)")
    if report.skipped:
        typer.echo(f"{len(report.skipped)} rows skipped (first: {report.skipped[0]})")
    if report.validation is not None:
        _print_validation(report.validation)


# `vtfusion demo` / `make demo`'s schedule (its figures and time: the README's figures table)
DEMO_EPOCHS, DEMO_RERANK_EPOCHS = 16, 7


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Working folder (catalog/, model/, collection/ and eval/ go inside).")] = Path("demo-run"),
    n: Annotated[int, typer.Option("--n", help="Catalog size.")] = 4000,
    epochs: Annotated[int, typer.Option("--epochs", help="Training passes over the catalog: a step budget, so the schedule does not depend on the machine's load.")] = DEMO_EPOCHS,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Also stop after this many minutes (the schedule then follows the clock: not repeatable).")] = None,
    rerank_epochs: Annotated[int | None, typer.Option("--rerank-epochs", help="Then epochs of the fusion layers alone on ITC's own candidates (0: none; default: 7 with the default --epochs, else half of --epochs, rounded up).")] = None,
    text_tower: TextTowerOpt = "scratch",
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="The model's input side in pixels (the catalog is rendered at 128).")] = 64,
) -> None:
    """The main job on the embedded default: catalog, train, index, search both ways, evaluate."""
    from vtfusion.catalogs.sources import CatalogError
    from vtfusion.indexer.collection import CollectionError
    from vtfusion.workflows.demo import run_demo

    printers = {
        "catalog": lambda counts: counts and _print_catalog(out / "catalog", counts),
        "plan": _print_plan,
        "train": _print_train,
        "collection": lambda c: _print_init(c, out / "collection", str(out / "model")),
        "ingest": lambda r: _print_ingest(r, out / "collection"),
        "eval": lambda r: _print_eval(r[0], r[1], out / "catalog" / "test.csv", out / "eval"),
        "search": lambda r: _print_search(r[1]),
    }
    try:
        if rerank_epochs is None:  # the demo's own schedule (DEMO_RERANK_EPOCHS); half of --epochs when that is changed
            rerank_epochs = DEMO_RERANK_EPOCHS if epochs == DEMO_EPOCHS else rerank_epochs_for(epochs)
        for step in run_demo(out, n=n, epochs=epochs, rerank_epochs=rerank_epochs, minutes=minutes,
                             text_tower=text_tower, device=device, seed=seed, image_size=image_size):
            if step.title:
                typer.echo(f"\n== {_safe(step.title)}")
            printers[step.kind](step.result)
    except (CatalogError, CollectionError, ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))


# ---- collections ----------------------------------------------------------------------------


def _open(collection: Path, read_only: bool = False):
    from vtfusion.indexer.collection import Collection, CollectionError
    from vtfusion.indexer.vectors import IndexMismatchError

    try:
        return Collection.open(collection, read_only=read_only)
    except (CollectionError, IndexMismatchError) as e:
        _fail(str(e))


@app.command("init")
def init_cmd(
    collection: Annotated[Path, typer.Argument(help="Folder to create the collection in.")],
    model: Annotated[str, typer.Option("--model", help="Model reference: a folder written by `vtfusion train`, hf:<BLIP retrieval id or folder>, or clip:<CLIP id or folder>.")],
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL (default: SQLite catalog.db inside the folder). ${NAME} parts are read from the environment at every open: keep passwords out of collection.toml.")] = "",
    index: Annotated[str, typer.Option("--index", help="FAISS factory string, or auto (exact when small, IVF when large).")] = "auto",
    token_dtype: Annotated[TokenDtype, typer.Option("--token-dtype", help="Rerank token cache: auto (fp16 up to 64 kB per image, else int8), fp16, int8, none (re-encode at query time).")] = TokenDtype.auto,
    nprobe: Annotated[int, typer.Option("--nprobe", help="IVF lists probed per search (the collection's default; search --nprobe overrides it).")] = 16,
    schema: Annotated[str, typer.Option("--schema", help="Metadata column types, e.g. 'zip:text,price:number' (others are inferred per column at the first ingest).")] = "",
) -> None:
    """Create a collection: collection.toml, the SQL schema, empty indexes and token cache."""
    from vtfusion.indexer.collection import Collection, CollectionError

    try:
        c = Collection.init(collection, model, db_url=db, index_factory=index, token_dtype=token_dtype.value, nprobe=nprobe, schema=schema)
    except (CollectionError, ValueError) as e:
        _fail(str(e))
    _print_init(c, collection, model)


def _print_init(c, collection: Path, model: str) -> None:
    from vtfusion.indexer.collection import mask_url

    typer.echo(
        f"created {collection} (model {c.config.model_fingerprint}, db {mask_url(c.engine.url.render_as_string(hide_password=False))}, "
        f"token cache {c.config.token_dtype}: {c.tokens.record_bytes / 1024:.1f} kB per image)"
    )
    if not c.bundle.has_itm:
        typer.echo("note: this model has no trained ITM head, so searches keep ITC order; train fusion layers with "
                   f"`vtfusion train CATALOG --init-from {model} --out DIR` and init a collection with DIR to rerank")


@app.command("ingest")
def ingest_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    source: Annotated[Path, typer.Argument(help="Folder of images, or a .csv / .jsonl / .parquet catalog.")],
    id_col: Annotated[str, typer.Option("--id-col")] = "id",
    image_col: Annotated[str, typer.Option("--image-col", help="Image path column, relative to the catalog file.")] = "image",
    text_col: Annotated[list[str] | None, typer.Option("--text-col", help="Text column(s) (default: whichever of title, caption, text, description exist).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per embedding batch and SQL transaction.")] = 64,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes (default: with a GPU up to 8 decode while the GPU embeds; on a CPU one per core, up to 16, each decoding and embedding on one thread). 0: all in this process.")] = None,
    source_name: Annotated[str | None, typer.Option("--source-name", help="Name the source (items are identified by source and id; default: the catalog's real path, however it is typed).")] = None,
    schema: Annotated[str | None, typer.Option("--schema", help="Declare metadata column types not registered yet, e.g. 'zip:text,price:number' (kept in collection.toml).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="local: this machine's processes; ray: a Ray cluster (pip install 'vtfusion[ray]').")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --engine ray: the cluster to join (HOST:PORT, ray://..., 'local' for a new one; default: RAY_ADDRESS, else the cluster `ray start` last started here, else a new local one).")] = None,
    actors: Annotated[int, typer.Option("--actors", help="With --engine ray: embedding actors (each loads the model once).")] = 1,
    gpus_per_actor: Annotated[float, typer.Option("--gpus-per-actor", help="With --engine ray: GPUs per actor (0: CPU actors).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON.")] = False,
) -> None:
    """Add a catalog's items to a collection (dedup by content; a changed row replaces its earlier version; re-running resumes).

    Exits 1 when any row failed (see `vtfusion errors`), 130/143 when stopped by SIGINT/SIGTERM
    (at a batch boundary: what was committed stays, re-running resumes)."""
    from vtfusion.catalogs.sources import CatalogError, Columns
    from vtfusion.indexer.collection import CollectionError
    from vtfusion.indexer.ingest import ingest

    if engine not in ("local", "ray"):
        _usage(f"--engine must be local or ray; got {engine!r}")
    if engine == "local" and (ray_address or actors != 1 or gpus_per_actor):
        _usage("--ray-address, --actors and --gpus-per-actor need --engine ray")
    if engine == "ray" and workers is not None:
        _usage("--workers is for --engine local; with --engine ray use --actors")
    c = _open(collection)
    cols = Columns(id_col, image_col, tuple(text_col) if text_col else None)
    try:
        if engine == "ray":
            from vtfusion.indexer.distributed import ingest_ray

            r = ingest_ray(c, source, cols, batch_size, actors, gpus_per_actor, ray_address, source_name=source_name, schema=schema)
        else:
            r = ingest(c, source, cols, batch_size, workers, source_name=source_name, schema=schema)
    except (CatalogError, CollectionError) as e:
        _fail(str(e))
    except OSError as e:  # a full disk, a read-only folder: what was committed stays, re-running resumes
        _fail(f"ingest stopped: {e.strerror or e} ({e.filename or 'collection files'}). Items committed before "
              "this are kept; fix the cause and run the same command again to resume")
    if as_json:
        from dataclasses import asdict

        _json({**asdict(r), "items_per_s": r.items_per_s})
    else:
        _print_ingest(r, collection)
    if r.stopped_by:
        raise typer.Exit(128 + r.stopped_signal)
    if r.failed:
        raise typer.Exit(1)


def _print_ingest(r, collection: Path) -> None:
    typer.echo(
        f"added {r.added} ({r.replaced} replacing older versions), skipped {r.duplicates} duplicates, "
        f"{r.failed} failed in {r.seconds:.1f} s "
        f"({r.items_per_s:.1f} items/s; " + ", ".join(f"{k} {v:.1f} s" for k, v in r.stages.items()) + ")"
    )
    if r.stopped_by:
        typer.secho(f"stopped by {r.stopped_by} at a batch boundary: {r.added} items of this run are committed; run the "
                    "same command again to resume", fg=typer.colors.YELLOW, err=True)
    elif r.failed:
        typer.secho(f"{r.failed} rows failed; see them with: vtfusion errors {collection}", fg=typer.colors.RED, err=True)


@app.command("errors")
def errors_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    limit: Annotated[int, typer.Option("--limit", help="Newest N errors.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False,
) -> None:
    """List ingest errors: file, line and reason of every item that was skipped."""
    from vtfusion.indexer.lifecycle import errors

    rows = errors(_open(collection), limit)
    if as_json:
        _json([{"file": e.file, "line": e.line, "reason": e.reason, "run_id": e.run_id, "at": e.at} for e in rows])
        return
    if not rows:
        typer.echo("no ingest errors")
    for e in rows:
        typer.echo(_safe(f"{e.file}:{e.line}: {e.reason}"))


@app.command("stats")
def stats_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Items, embeddings, index types and sizes, token cache, model and database."""
    import json

    from vtfusion.indexer.lifecycle import stats

    st = stats(_open(collection))
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    rows = []
    for k, v in st.items():
        if isinstance(v, dict):  # one row per entry (indexes by modality, ...)
            rows += [[k if i == 0 else "", f"{sk}: " + (", ".join(f"{a} {b}" for a, b in sv.items()) if isinstance(sv, dict) else str(sv))]
                     for i, (sk, sv) in enumerate(v.items())] or [[k, "-"]]
        else:
            rows.append([k, v])
    _table([("", "left"), ("", "left")], rows, header=False)


def _chosen(c, ids, where, status):
    """Items selected by --ids / --where (with ``status``), and the --ids that named none."""
    from vtfusion.indexer.filters import FilterError
    from vtfusion.indexer.lifecycle import select_items, unknown_ids

    try:
        chosen = select_items(c, ids, where, status=status)
    except (FilterError, ValueError) as e:
        _fail(str(e))
    unknown = unknown_ids(c, ids, status=status) if ids else []
    if unknown:
        typer.secho(f"warning: {len(unknown)} ids match no {status} item: {_safe(', '.join(unknown[:10]))}", fg=typer.colors.YELLOW, err=True)
    return chosen, unknown


def _preview(c, verb: str, chosen: list[int]) -> None:
    from vtfusion.indexer.lifecycle import describe

    typer.echo(f"{verb} {len(chosen)} items" + (":" if chosen else ""))
    for item_id, ext, text in describe(c, chosen):
        typer.echo(f"  #{item_id:<7} {_safe(ext):<16} {_safe(text[:60])}")
    if len(chosen) > 10:
        typer.echo(f"  ... and {len(chosen) - 10} more")


@app.command("delete")
def delete_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    ids: Annotated[list[str] | None, typer.Option("--ids", help="External ids (or #ITEM_ID); repeatable.")] = None,
    where: Annotated[str | None, typer.Option("--where", help="Filter expression, e.g. \"color = 'red' AND price < 20\".")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show how many items and which would be deleted; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking, however many items match.")] = False,
    confirm_above: Annotated[int, typer.Option("--confirm-above", help="Ask before deleting more than this many items.")] = 10,
) -> None:
    """Delete items (tombstones in SQL, removed from the indexes); `vtfusion restore` brings them back.

    Unknown ids are reported (exit 1 when any --ids matched nothing)."""
    import sys

    from vtfusion.indexer.lifecycle import delete
    from vtfusion.indexer.store import ItemStatus

    c = _open(collection)
    chosen, unknown = _chosen(c, ids, where, ItemStatus.ACTIVE)
    if dry_run:
        _preview(c, "would delete", chosen)
        raise typer.Exit(1 if unknown else 0)
    if len(chosen) > confirm_above and not yes:
        _preview(c, "about to delete", chosen)
        if not sys.stdin.isatty():
            _fail(f"{len(chosen)} items match (more than --confirm-above {confirm_above}); pass --yes to delete them")
        if not typer.confirm(f"delete these {len(chosen)} items?"):
            _fail("nothing deleted")
    n = delete(c, chosen)
    typer.echo(f"deleted {n} items" + (f"; restore them with: vtfusion restore {collection} --ids '#ID'" if n else ""))
    if unknown:
        raise typer.Exit(1)


@app.command("restore")
def restore_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    ids: Annotated[list[str] | None, typer.Option("--ids", help="External ids (or #ITEM_ID) of deleted items; repeatable.")] = None,
    where: Annotated[str | None, typer.Option("--where", help="Filter expression over deleted items' metadata.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be restored; change nothing.")] = False,
) -> None:
    """Bring deleted items back, with their stored embeddings and token records."""
    from vtfusion.indexer.maintenance import restore
    from vtfusion.indexer.store import ItemStatus

    c = _open(collection)
    chosen, unknown = _chosen(c, ids, where, ItemStatus.DELETED)
    if dry_run:
        _preview(c, "would restore", chosen)
        raise typer.Exit(1 if unknown else 0)
    r = restore(c, chosen)
    typer.echo(f"restored {len(r.restored)} items")
    for why in r.skipped:
        typer.echo(f"skipped {_safe(why)}")
    for why in r.no_tokens:
        typer.secho(f"restored without a token record ({_safe(why)}); `vtfusion repair {collection}` once the image is back",
                    fg=typer.colors.YELLOW, err=True)
    if unknown or r.skipped or r.no_tokens:
        raise typer.Exit(1)


@app.command("repair")
def repair_cmd(collection: Annotated[Path, typer.Argument(help="Collection folder.")]) -> None:
    """Re-encode exactly the token records that fail their check; rebuild indexes that disagree with SQL."""
    from vtfusion.indexer.collection import Collection, CollectionError
    from vtfusion.indexer.maintenance import repair

    try:
        c = Collection.open(collection, catch_up=False)
        r = repair(c)
    except CollectionError as e:
        _fail(str(e))
    typer.echo(f"re-encoded {r.records_rewritten} token records; rebuilt indexes: {', '.join(r.indexes_rebuilt) or 'none'}")
    for why in r.unrepairable:
        typer.secho(f"cannot repair {_safe(why)}", fg=typer.colors.RED, err=True)
    if r.unrepairable:
        raise typer.Exit(1)


@app.command("compact")
def compact_cmd(collection: Annotated[Path, typer.Argument(help="Collection folder.")]) -> None:
    """Rewrite the token cache without deleted items' records (crash-safe) and vacuum the database."""
    from vtfusion.indexer.collection import CollectionError
    from vtfusion.indexer.maintenance import compact

    try:
        r = compact(_open(collection))
    except CollectionError as e:
        _fail(str(e))
    typer.echo(f"token cache: kept {r.records_kept} records, dropped {r.records_dropped}, reclaimed {r.bytes_reclaimed} bytes "
               f"({r.bytes_before} -> {r.bytes_after}); database {'vacuumed' if r.vacuumed else 'not vacuumed'}")


@app.command("reembed")
def reembed_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    model: Annotated[str, typer.Option("--model", help="Model reference to re-embed with (default: the collection's, e.g. after retraining it in place).")] = "",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
) -> None:
    """Recompute every item's embeddings and token records with a model, then switch to it atomically (resumable)."""
    from vtfusion.indexer.collection import Collection, CollectionError
    from vtfusion.indexer.maintenance import reembed

    try:
        c = Collection.open(collection, catch_up=False)
        r = reembed(c, model or c.config.model, batch_size=batch_size)
    except CollectionError as e:
        _fail(str(e))
    typer.echo(f"re-embedded {r.embedded} items with {r.fingerprint} ({r.resumed} from an earlier run)")
    if r.stopped_by:
        typer.secho(f"stopped by {r.stopped_by} at a batch boundary: {r.resumed + r.embedded} items are staged, nothing "
                    "switched; run the same command again to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(128 + r.stopped_signal)
    for why in r.failed[:20]:
        typer.secho(f"failed {_safe(why)}", fg=typer.colors.RED, err=True)
    if not r.switched:
        _fail(f"{len(r.failed)} items could not be re-embedded; nothing was switched. Fix their files or delete them "
              "(vtfusion delete --ids '#ID'), then run the same command again")
    typer.echo(f"switched {collection} to model {r.fingerprint}; indexes rebuilt")


@app.command("verify")
def verify_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result.")] = False,
) -> None:
    """Reconcile SQL with the FAISS indexes and the token cache; exit 1 on any mismatch."""
    from vtfusion.indexer.collection import Collection, StaleIndexError
    from vtfusion.indexer.lifecycle import verify

    try:
        c = Collection.open(collection)  # opening applies pending changes: verify checks what a search sees
    except StaleIndexError:
        c = Collection.open(collection, catch_up=False)  # reported below, with the fix
    except Exception:  # noqa: BLE001 - the message of _open
        c = _open(collection)
    r = verify(c)
    if as_json:
        _json({"ok": r.ok, "problems": r.problems, "notes": r.notes})
        raise typer.Exit(0 if r.ok else 1)
    for n in r.notes:
        typer.echo(f"note: {n}")
    if r.ok:
        typer.echo("ok: SQL, indexes and token cache agree")
        return
    for p in r.problems:
        typer.secho(f"mismatch: {p}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command("reindex")
def reindex_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    index: Annotated[str | None, typer.Option("--index", help="New FAISS factory string (default: keep).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray: shards added in parallel Ray tasks, then merged.")] = "local",
    shards: Annotated[int, typer.Option("--shards", help="With --engine ray: id-range shards (one Ray task each).")] = 2,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --engine ray: the cluster to join.")] = None,
    in_memory: Annotated[bool, typer.Option("--in-memory", help="With --engine ray: merge the shards into an ordinary in-memory "
                                            "index (default for IVF: lists merged on disk and memory-mapped).")] = False,
) -> None:
    """Rebuild the FAISS indexes from the embeddings stored in SQL."""
    from vtfusion.indexer.collection import Collection
    from vtfusion.indexer.lifecycle import reindex

    if engine not in ("local", "ray"):
        _usage(f"--engine must be local or ray; got {engine!r}")
    if engine == "local" and (ray_address or shards != 2 or in_memory):
        _usage("--shards, --ray-address and --in-memory need --engine ray")
    try:
        c = Collection.open(collection, catch_up=False)
        if engine == "ray":
            from vtfusion.indexer.distributed import reindex_ray

            built = {m: f"{r['factory']} ({r['count']} vectors from {r['shards']} shards, {r['seconds']} s; {r['layout']})"
                     for m, r in reindex_ray(c, index, shards, ray_address, on_disk=not in_memory).items()}
        else:
            built = reindex(c, index)
    except (RuntimeError, ValueError) as e:  # CollectionError, IndexTypeError
        _fail(str(e))
    typer.echo("rebuilt " + ", ".join(f"{m}: {f}" for m, f in built.items()))


# ---- search -----------------------------------------------------------------------------------


@app.command("search")
def search_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    text: Annotated[str | None, typer.Argument(help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query by an image file.")] = None,
    item: Annotated[str | None, typer.Option("--item", help="More like this item: its catalog id (as search prints it) or #ITEM_ID.")] = None,
    target: Annotated[Target, typer.Option("--target", help="What to return.")] = Target.image,
    k: Annotated[int, typer.Option("-k", help="Hits to return.")] = 10,
    where: Annotated[str | None, typer.Option("--where", help="Filter expression over metadata.")] = None,
    rerank_depth: Annotated[int, typer.Option("--rerank-depth", help="ITC candidates rescored by ITM (0: none).")] = 32,
    fusion: Annotated[Fusion, typer.Option("--fusion", help="The score reranked candidates are sorted by.")] = Fusion.itm_itc,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable hits and timings.")] = False,
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="IVF lists to probe (default: the collection's; more is slower and closer to exact).")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Write nothing under the collection folder (a search process sharing it with writers on other machines): indexes are caught up from the change log in memory.")] = False,
) -> None:
    """Search a collection by text, image or item; rerank with cross-attention ITM."""
    import json

    from vtfusion.search.engine import ItemQuery, SearchEngine, SearchError

    given = [q for q in (text, image, item) if q is not None]
    if len(given) != 1:
        _usage("give exactly one query: a TEXT argument, --image PATH or --item ID")
    query = ItemQuery(item) if item is not None else image if image is not None else text
    if image is not None and not image.is_file():
        _fail(f"image not found: {image}")
    from vtfusion.indexer.collection import CollectionError

    try:
        res = SearchEngine(_open(collection, read_only)).search(query, target.value, k, where, rerank_depth, fusion.value, nprobe=nprobe)
    except (SearchError, CollectionError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2, default=str))
        return
    _print_search(res)


def _print_search(res) -> None:
    rows = []
    for h in res.hits:
        moved = f"+{h.moved}" if h.moved > 0 else str(h.moved) if h.moved else "."
        rows.append([h.rank, moved, f"{h.fused:.3f}", f"{h.itm:.3f}" if h.itm is not None else "-", f"{h.itc:.3f}",
                     h.external_id, _shown_path(h.image_path), h.text[:60]])
    _table([("#", "right"), ("moved", "right"), ("fused", "right"), ("ITM p", "right"), ("ITC", "right"), ("item", "left"),
            ("image", "left"), ("text", "left")], rows)
    typer.echo("timings ms: " + ", ".join(f"{s} {v:.1f}" for s, v in res.timings_ms.items()) + f"; reranked {res.rerank_depth}")
    for n in res.notes:
        typer.echo(f"note: {_safe(n)}")


@app.command("eval")
def eval_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder (only read: evaluation never writes to it).")],
    pairs: Annotated[Path, typer.Argument(help="CSV of (image, caption) rows, a Karpathy JSON (dataset_coco.json, dataset_flickr30k.json) or a BLIP/ALBEF annotation JSON.")],
    depths: Annotated[str, typer.Option("--depths", help="Comma-separated rerank depths (0 = ITC only).")] = "0,16,32,64,128",
    out: Annotated[Path, typer.Option("--out", help="Folder for report.json, report.md, the plots and trec/ (run files, qrels).")] = Path("eval-report"),
    fusion: Annotated[Fusion, typer.Option("--fusion", help="The score reranked candidates are sorted by.")] = Fusion.itm_itc,
    gallery: Annotated[Gallery, typer.Option("--gallery", help="pairs: rank the pairs' own images and captions (BLIP's protocol); collection: rank every active item of the collection.")] = Gallery.pairs,
    where: Annotated[str | None, typer.Option("--where", help="With --gallery collection: only items matching this filter form the gallery.")] = None,
    image_col: Annotated[str, typer.Option("--image-col")] = "image",
    text_col: Annotated[str, typer.Option("--text-col")] = "caption",
    split: Annotated[str, typer.Option("--split", help="Karpathy JSON split to use.")] = "test",
    latency_queries: Annotated[int, typer.Option("--latency-queries", help="Searches timed per depth.")] = 50,
    run_depth: Annotated[int, typer.Option("--run-depth", help="Ranked items per query in the TREC run files.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json's content (the files are written too).")] = False,
    itm_weight: Annotated[float | None, typer.Option("--itm-weight", help="The ITM logit's weight in itm+itc at every depth (default: the model's calibrated weight per depth; 1 is the plain sum).")] = None,
) -> None:
    """Reranking evaluation: Recall@1/5/10, MRR, nDCG@10, paired tests and latency, ITC only vs each depth."""
    from vtfusion.search.evaluate import evaluate
    from vtfusion.search.report import write_report

    try:
        ds = [int(d) for d in depths.split(",") if d.strip()]
    except ValueError:
        _usage(f"--depths must be comma-separated integers; got {depths!r}")
    try:
        rep = evaluate(_open(collection), pairs, ds, fusion.value, latency_queries, gallery=gallery.value, where=where,
                       trec_dir=out / "trec", run_depth=run_depth, image_col=image_col, text_col=text_col, split=split,
                       itm_weight=itm_weight)
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))
    files = write_report(rep, out)
    if as_json:
        _json({**rep.to_dict(), "files": [str(f) for f in files]})
        return
    _print_eval(rep, files, pairs, out)


def _print_eval(rep, files: list[Path], pairs: Path, out: Path) -> None:
    from vtfusion.search.report import LATENCY_KEYS

    typer.echo(f"{rep.texts} captions of {rep.images} images evaluated ({rep.rows} rows read); "
               f"gallery: {rep.gallery} ({rep.gallery_size['t2i']} images, {rep.gallery_size['i2t']} texts)")
    for x in rep.skipped[:10]:
        typer.echo(f"skipped: {_safe(str(pairs))}:{x['line']}: {_safe(x['reason'])}")
    if len(rep.skipped) > 10:
        typer.echo(f"skipped: {len(rep.skipped) - 10} more rows (report.json lists them all)")
    rows = []
    for direction in ("t2i", "i2t"):
        timings = getattr(rep, LATENCY_KEYS[direction])
        for key, m in getattr(rep, direction).items():
            ms = timings.get(key, {}).get("total", {}).get("mean")  # (--latency-queries 0: not timed)
            rows.append([
                {"t2i": "text -> image", "i2t": "image -> text"}[direction], key, f"{m['R@1']:.1f}", f"{m['R@5']:.1f}",
                f"{m['R@10']:.1f}", f"{m['MRR']:.3f}", f"{m['nDCG@10']:.3f}",
                f"{m['wins']}/{m['ties']}/{m['losses']}" if "wins" in m else "–",
                f"{m['p_value_vs_itc']:.2g}" if "p_value_vs_itc" in m else "–", f"{ms:.1f}" if ms is not None else "–",
            ])
    _table([("direction", "left"), ("stage", "left"), ("R@1", "right"), ("R@5", "right"), ("R@10", "right"), ("MRR", "right"),
            ("nDCG@10", "right"), ("w/t/l vs ITC", "right"), ("p", "right"), ("ms", "right")], rows)
    if rep.fusion == "itm+itc" and any(w != 1.0 for w in rep.itm_weights.values()):
        typer.echo("ITM weight in the fused score: " + ", ".join(f"{k} {w:g}" for k, w in rep.itm_weights.items()))
    for n in rep.notes:
        typer.echo(f"note: {_safe(n)}")
    typer.echo("wrote " + ", ".join(str(f) for f in files) + f", {out / 'trec'}/")


def ui_command(collection: Path, port: int, address: str, max_upload_mb: int, read_only: bool = False) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and environment ``vtfusion ui`` executes."""
    import os
    import sys

    app_py = Path(__file__).with_name("app.py")
    argv = [
        sys.executable, "-P", "-m", "streamlit", "run", str(app_py),  # -P: the working folder is not put on sys.path
        "--server.headless=true", "--browser.gatherUsageStats=false", "--global.developmentMode=false",
        f"--server.port={port}", f"--server.address={address}", f"--server.maxUploadSize={max_upload_mb}",
        "--client.showErrorDetails=none", "--client.toolbarMode=minimal", "--server.fileWatcherType=none",
    ]
    env = {**os.environ, "VTFUSION_COLLECTION": str(collection.resolve()), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "VTFUSION_READ_ONLY": "1" if read_only else ""}
    return argv, env


@app.command("ui")
def ui_cmd(
    collection: Annotated[Path, typer.Argument(help="Collection folder.")],
    port: Annotated[int, typer.Option("--port", help="TCP port to serve on.")] = 8501,
    address: Annotated[str, typer.Option("--address", help="Interface to bind (0.0.0.0 exposes it to the network; there is no login).")] = "127.0.0.1",
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Upload cap for catalogs and archives, in MB.")] = 500,
    read_only: Annotated[bool, typer.Option("--read-only", help="Search only: open the collection read-only (no ingest; "
                                            "follows writers elsewhere, as `search --read-only`).")] = False,
) -> None:
    """Start the web front end (search, collection, evaluation) for a collection."""
    import os

    if not (collection / "collection.toml").is_file():
        _fail(f"{collection} is not a collection (no collection.toml); create one with `vtfusion init`")
    argv, env = ui_command(collection, port, address, max_upload_mb, read_only)
    typer.echo(f"vtfusion ui: http://{address}:{port}  (collection {collection.resolve()})")
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    app()
