"""One import name: everything installs under ``vtfusion``; a user's own ``models.py``,
``search.py``, ``ui.py`` or ``indexer.py`` in the working folder changes nothing for the CLI, the
Python API or the web app; the README's Python API example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHADOWS = ("models", "catalogs", "indexer", "search", "workflows", "ui")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, model_dir, small_catalog):
    """What `make demo` leaves, small: demo-run/catalog, demo-run/model and demo-run/collection
    (its training split)."""
    import shutil

    import vtfusion

    base = tmp_path_factory.mktemp("api")
    shutil.copytree(small_catalog, base / "demo-run" / "catalog")
    shutil.copytree(model_dir, base / "demo-run" / "model")
    col = vtfusion.create_collection(base / "demo-run" / "collection", base / "demo-run" / "model")
    vtfusion.ingest(col, base / "demo-run" / "catalog" / "train.csv", workers=0, progress=False)
    col.close()
    return base


def _user_folder(base: Path) -> Path:
    """A user's project folder with modules named like ours, each failing loudly if imported."""
    d = base / "userproj"
    d.mkdir(exist_ok=True)
    for name in SHADOWS:
        (d / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    return d


def test_nothing_installs_generic_top_level_names():
    import importlib.util

    import vtfusion

    assert re.fullmatch(r"\d+\.\d+\.\d+.*", vtfusion.__version__)
    clean = subprocess.run([sys.executable, "-P", "-c", "import importlib.util as u; print([n for n in "
                            f"{list(SHADOWS)!r} if u.find_spec(n)])"], capture_output=True, text=True, cwd="/", check=True)
    assert clean.stdout.strip() == "[]", clean.stdout
    assert Path(importlib.util.find_spec("vtfusion.models").origin).resolve().parent == ROOT / "models"


def test_a_user_folder_with_models_py_changes_nothing(tmp_path, demo_run):
    user = _user_folder(tmp_path)
    col = demo_run / "demo-run" / "collection"
    env = {**os.environ, "PYTHONPATH": str(user)}  # even first on the path: nothing of ours is named like them
    cli = subprocess.run([sys.executable, "-m", "vtfusion.ui.cli", "search", str(col), "a red mug", "-k", "3"],
                         capture_output=True, text=True, cwd=user, env=env, timeout=300)
    assert cli.returncode == 0 and "user's own" not in cli.stderr, cli.stderr[-2000:]
    api = subprocess.run([sys.executable, "-c", f"import vtfusion; r = vtfusion.query(vtfusion.open_collection({str(col)!r}), "
                          "'a red mug', k=3); print(len(r.hits))"], capture_output=True, text=True, cwd=user, env=env, timeout=300)
    assert api.returncode == 0 and api.stdout.strip().splitlines()[-1] == "3", api.stderr[-2000:]
    # the web app: `vtfusion ui` runs Streamlit with -P (the working folder is not put on the path)
    # and the app imports nothing by a generic name even when the folder is on the path
    from vtfusion.ui.cli import ui_command

    argv, _ = ui_command(col, 8599, "127.0.0.1", 10)
    assert argv[:3] == [sys.executable, "-P", "-m"]
    app = subprocess.run([sys.executable, "-c", "import vtfusion.ui.app"], capture_output=True, text=True, cwd=user, env=env, timeout=300)
    assert app.returncode == 0, app.stderr[-2000:]


def test_readme_python_api_example_runs(demo_run, monkeypatch, capsys):
    """The README's "Python API" block, executed as written in the folder `make demo` leaves."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(demo_run)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^1 p\d{6} ", out, re.M), out  # ranked hits with their external ids
    assert re.search(r"^R@1 [\d.]+ -> [\d.]+$", out, re.M), out


def test_readme_first_screen_commands_run(demo_run, tmp_path):
    """The commands the README's first screen gives after `make demo`, run as written (the
    folder of "your own images" is the demo's image folder; `ui` is checked up to the command
    it would start)."""
    import shlex

    from vtfusion.ui.cli import ui_command

    text = (ROOT / "README.md").read_text()
    first = text[text.index("## Start here"):text.index("## Python API")]
    block = re.findall(r"```sh\n(.*?)```", first, re.S)[1]
    commands = [c.split("#")[0].strip() for line in block.splitlines() for c in line.split("&&") if c.strip()]
    assert [c.split()[1] for c in commands] == ["search", "ui", "init", "ingest"], commands
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True)
    for img in sorted((demo_run / "demo-run" / "catalog" / "images").iterdir())[:5]:
        (home / "Pictures" / img.name).write_bytes(img.read_bytes())
    env = {**os.environ, "HOME": str(home)}
    for c in commands:
        argv = shlex.split(c.replace("~", str(home)))
        assert argv[0] == ".venv/bin/vtfusion", c
        if argv[1] == "ui":
            ui_argv, ui_env = ui_command(demo_run / argv[2], 8501, "127.0.0.1", 500)
            assert (Path(ui_env["VTFUSION_COLLECTION"]) / "collection.toml").is_file() and "streamlit" in ui_argv
            continue
        r = subprocess.run([sys.executable, "-m", "vtfusion.ui.cli", "-q", *argv[1:]], cwd=demo_run, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (c, r.stdout[-2000:], r.stderr[-2000:])
        if argv[1] == "search":
            assert re.search(r"^\s*1 .* p\d{6} ", r.stdout, re.M), r.stdout
        if argv[1] == "ingest":
            assert "added 5" in r.stdout, r.stdout
