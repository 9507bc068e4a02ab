"""The progress bar on stderr (tqdm): fits the terminal, shows rate and ETA, silent when not a terminal.

tqdm is imported when the first bar is drawn, so that a verb that draws none never loads it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def terminal_width(stream: TextIO) -> int:
    """The columns of the terminal ``stream`` writes to: ``COLUMNS`` if set, else the terminal's, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
    return columns if columns > 0 else 80


class Progress:
    """Call with (done, total) in bytes; draws a tqdm bar on ``stream``; silent when disabled.

    ``enabled`` None means "when ``stream`` is a terminal" (``--progress``/``--no-progress``
    give True/False). The bar is one column narrower than the terminal, so that it never wraps.
    """

    def __init__(self, label: str, *, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        """Move the bar to ``done`` of ``total`` bytes (tqdm redraws at most 10 times a second)."""
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm  # lazily: most commands never draw a bar
            self._bar = tqdm(total=total, desc=self.label, file=self.stream, unit="B", unit_scale=True,
                             unit_divisor=1024, ncols=terminal_width(self.stream) - 1, mininterval=0.1,
                             leave=True, ascii=not _unicode(self.stream))
        if total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def finish(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _unicode(stream: TextIO) -> bool:
    """Whether ``stream`` can show the block characters of tqdm's smooth bar."""
    encoding = getattr(stream, "encoding", None) or ""
    return encoding.lower().replace("-", "") in ("utf8", "utf_8")
