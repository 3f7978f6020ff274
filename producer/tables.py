"""Text output for people: tables with a header row and aligned columns, sizes in KiB/MiB/GiB,
times as local ISO times and durations. `--json` output never comes through here: it keeps
bytes, epoch seconds and the records' own fields, for scripts."""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Iterable, Sequence

GAP = "  "  # between columns, as `pvesm status` prints them


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[str] = ()) -> str:
    """Render rows under a header row; cells are plain text, `right` columns are right-aligned
    (numbers, sizes). Never wrapped or cut short, whatever the terminal: a path or a reason is
    read whole. Linear in the cells (10,000 guests in tens of milliseconds)."""
    aligned = [name in set(right) for name in columns]
    grid = [list(columns), *([_one_line(text(cell)) for cell in row] for row in rows)]
    for row in grid:
        if len(row) > len(columns):
            raise ValueError(f"a row of {len(row)} cells under {len(columns)} columns")
        row.extend([""] * (len(columns) - len(row)))
    widths = [max(_width(row[i]) for row in grid) for i in range(len(columns))]
    lines = (GAP.join(_pad(cell, width, right_aligned) for cell, width, right_aligned
                      in zip(row, widths, aligned, strict=True)).rstrip() for row in grid)
    return "\n".join(line for line in lines if line)


def _one_line(cell: str) -> str:
    return " ".join(cell.splitlines()) if "\n" in cell or "\r" in cell else cell


def _width(cell: str) -> int:
    """The columns a terminal gives the text: East Asian wide characters take two, combining marks none."""
    if cell.isascii():
        return len(cell)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in cell)


def _pad(cell: str, width: int, right_aligned: bool) -> str:
    fill = " " * (width - _width(cell))
    return fill + cell if right_aligned else cell + fill


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
