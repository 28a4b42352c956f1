"""Progress for long work (training, decoding, ingest, evaluation) on a terminal and off it.

On a terminal: a tqdm bar. Elsewhere (output to a log file, a CI job, a service manager) a
redrawn bar is useless and tqdm turns itself off, so a run of an hour said nothing until it
ended. There, the same bar is written as a log line (logger ``vtfusion.progress``, INFO) when
it starts, every ``LOG_EVERY_S`` seconds, and when it ends: it shows wherever the program's
logging goes, and ``vtfusion -q`` silences it with the rest of the INFO lines.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

log = logging.getLogger("vtfusion.progress")
LOG_EVERY_S = float(os.environ.get("VTFUSION_PROGRESS_EVERY", "30"))


class _Discard:
    def write(self, _):
        pass

    def flush(self):
        pass


class _LogLines(tqdm):
    """A tqdm whose redraws are log lines: at most one per ``mininterval``, and the last."""

    _logged_at = float("-inf")
    _closing = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("mininterval", LOG_EVERY_S)
        kwargs.setdefault("maxinterval", max(LOG_EVERY_S, 10.0))
        kwargs.setdefault("ncols", 0)  # the text only: no bar of block characters
        kwargs["file"] = _Discard()  # what tqdm writes itself (a newline on close) goes nowhere
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # noqa: ARG002 - tqdm's signature
        # tqdm also redraws on every set_postfix(refresh=True) and refresh(): on a terminal that
        # overwrites a line, in a log it would add one; so at most one per interval, and the last
        now = self._time()
        if self._closing or now - self._logged_at >= self.mininterval:
            self._logged_at = now
            log.info("%s", msg if msg is not None else self.format_meter(**self.format_dict))
        return True

    def close(self):
        self._closing = True
        super().close()


def progress(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; log lines elsewhere; nothing when not ``enabled``."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    stream = kwargs.get("file") or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, **kwargs)
    return _LogLines(iterable, **kwargs)
