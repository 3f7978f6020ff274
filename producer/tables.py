"""Text output for people: tables with a header row and aligned columns, sizes in KiB/MiB/GiB,
times as local ISO times and durations. `--json` output never comes through here: it keeps
bytes, epoch seconds and the records' own fields, for scripts."""

from __future__ import annotations

import datetime
import io
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[str] = ()) -> str:
    """Render rows under a header row; cells are plain text (no markup), `right` columns are
    right-aligned (numbers, sizes). Wide tables are not wrapped when the output is a pipe."""
    aligned = set(right)
    grid = Table(box=None, show_edge=False, pad_edge=False, highlight=False, header_style="")  # as pvesm status
    for name in columns:
        grid.add_column(name, justify="right" if name in aligned else "left", no_wrap=True, overflow="ignore")
    for row in rows:
        grid.add_row(*(text(cell) for cell in row))
    out = io.StringIO()
    # never cut a path or a reason short: as wide as the rows need, whatever the terminal
    Console(file=out, width=100_000, no_color=True, highlight=False, markup=False, emoji=False).print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())


def text(value: object) -> str:
    """A cell or value as a person reads it: no Python reprs (None, True, lists)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple | set):
        return ", ".join(text(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={text(v)}" for k, v in value.items()) or "-"
    return str(value)


def size(n: int | None) -> str:
    """Bytes as KiB, MiB, GiB, TiB (one decimal), or B below 1 KiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when(epoch: float | None) -> str:
    """Epoch seconds as a local ISO time to the second; '-' for never."""
    if not epoch:
        return "-"
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def when_text(iso: str | None) -> str:
    """An ISO time as stored (UTC, `Z` or an offset) as `when` shows times: local, to the
    second; text that is not a time is left as it is."""
    if not iso:
        return "-"
    try:
        moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return when(moment.timestamp())


def duration(seconds: float | None) -> str:
    """1.2s, 4m05s, 2h03m: a duration as people read it."""
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
