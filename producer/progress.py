"""How a waiting CLI shows a job: a live bar on a terminal, one line per step elsewhere."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def bar_line(event: dict[str, Any], steps: list[str], width: int = 24) -> str:
    step = event.get("step", "")
    index = steps.index(step) + 1 if step in steps else 0
    head = f"[{index}/{len(steps)}] {step}" if index else step  # steps unknown: history trimmed
    total, done = event.get("total") or 0, max(event.get("done") or 0, 0)
    if not total:
        return head
    frac = min(done / total, 1.0)
    filled = int(frac * width)
    rate = event.get("rate") or 0  # of data moved where the copy knows its data (holes go fast)
    left = (event["data_total"] - (event.get("data_done") or 0)) if "data_total" in event else total - done
    eta = f" ETA {int(left / rate)}s" if rate > 0 and done < total else ""
    data = f" (data {human_bytes(event.get('data_done') or 0)}/{human_bytes(event['data_total'])})" \
        if "data_total" in event else ""
    return (f"{head} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{human_bytes(done)}/{human_bytes(total)}{data} {human_bytes(rate)}/s{eta}")


class ProgressView:
    """Feeds on job events; draws a live view on `out` (stderr) when it is a terminal, and
    nothing otherwise (scripts read results on stdout, errors alone on stderr)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.live = self.out.isatty()
        self.steps: list[str] = []
        self.drawn = False

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.live:
            return
        phase = event.get("phase")
        if phase == "queued":
            self.steps = list(event.get("steps", []))
            self._line(f"job {event['job']} queued ({event['kind']})", keep=True)
        elif phase == "start":
            self._line(bar_line(event, self.steps) + f" on {event.get('node')}", keep=False)
        elif phase == "progress":
            self._line(bar_line(event, self.steps), keep=False)
        elif phase == "failed":
            self._line(f"failed: {event.get('message')}", keep=True)
        elif phase == "undo":
            self._line(f"undo {event.get('step')}", keep=True)
        elif phase in ("abandon", "not_begun"):
            self._line(event.get("message", ""), keep=True)
        elif phase == "finished":
            self._finish_line()

    def _line(self, text: str, keep: bool) -> None:
        self.out.write("\r\033[K" + text + ("\n" if keep else ""))
        self.drawn = not keep
        self.out.flush()

    def _finish_line(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
