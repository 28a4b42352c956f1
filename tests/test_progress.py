"""Progress off a terminal is log lines (start, every LOG_EVERY_S, end); on one, a tqdm bar."""

from __future__ import annotations

import io
import logging

from vtfusion.models import progress as progress_mod
from vtfusion.models.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vtfusion.progress"]


def test_off_a_terminal_progress_is_log_lines(caplog, monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)  # every update is due
    with caplog.at_level(logging.INFO, logger="vtfusion.progress"):
        bar = progress(total=4, desc="ingest", unit="item")
        for i in range(4):
            bar.update(1)
            bar.set_postfix(added=i + 1, refresh=False)
        bar.close()
    lines = _lines(caplog)
    assert lines[0].startswith("ingest:   0% 0/4")
    assert lines[-1].startswith("ingest: 100% 4/4") and "added=4" in lines[-1]
    assert any(" 50% 2/4" in x for x in lines)  # the updates in between, not just both ends


def test_log_lines_are_rate_limited_and_silent_when_disabled(caplog):
    with caplog.at_level(logging.INFO, logger="vtfusion.progress"):
        assert list(progress(range(500), desc="eval", unit="chunk")) == list(range(500))
        assert len(_lines(caplog)) == 2  # LOG_EVERY_S is 30 s: the start and the end only
        caplog.clear()
        assert list(progress(range(5), desc="eval", enabled=False)) == list(range(5))
    assert _lines(caplog) == []


def test_refreshes_between_intervals_add_no_lines(caplog):
    with caplog.at_level(logging.INFO, logger="vtfusion.progress"):
        bar = progress(total=10, desc="train", unit="step")
        for i in range(10):
            bar.update(1)
            bar.set_postfix(loss=10 - i)  # refresh=True: tqdm redraws each time
        bar.close()
    lines = _lines(caplog)
    assert len(lines) == 2 and lines[-1].startswith("train: 100% 10/10") and "loss=1" in lines[-1]


def test_on_a_terminal_progress_is_a_redrawn_bar(caplog):
    term = _Terminal()
    with caplog.at_level(logging.INFO, logger="vtfusion.progress"):
        for _ in progress(range(3), desc="train", unit="step", file=term):
            pass
    assert "train: 100%" in term.getvalue() and "\r" in term.getvalue()
    assert _lines(caplog) == []


def test_the_last_ingest_line_has_the_final_counts(tmp_path, model_dir, small_catalog, caplog):
    """The writer commits the last batch after the loop hands it over: the bar closes only after
    that, so its last line says what was added (it used to lag a batch behind)."""
    import logging

    import vtfusion

    col = vtfusion.create_collection(tmp_path / "col", model_dir)
    with caplog.at_level(logging.INFO, logger="vtfusion.progress"):
        r = vtfusion.ingest(col, small_catalog / "train.csv", workers=0, batch_size=8, progress=True)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vtfusion.progress" and rec.getMessage().startswith("ingest")]
    assert lines and f"added={r.added}," in lines[-1] and r.added > 8, lines
