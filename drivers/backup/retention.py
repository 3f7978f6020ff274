"""Which backups a prune keeps: Proxmox Backup Server's keep-* rules as a pure function.

The rules run in a fixed order: last, hourly, daily, weekly, monthly, yearly. Each one walks
the backups newest first and keeps the newest backup of each new period (an hour, a day, an
ISO week, ...) until it has kept as many periods as it was asked for. A period already
covered by a backup an earlier rule kept is not counted again, and a backup whose period a
newer backup took in this rule's walk is marked for removal. Protected backups are always
kept and never count; so are, unlike PBS, backups whose last verify failed (`failed`): a
damaged backup must not stand for a sound one. What no rule keeps is removed; with no rule
at all, everything is kept.
All periods are taken in UTC (PBS uses the server's local time).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

TYPE_CHECKING = False  # typing's own is not imported: the command line reads Keep at startup
if TYPE_CHECKING:
    from drivers.backup.records import Snapshot

OPTIONS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Keep:
    """How many of each period to keep; 0 turns a rule off."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for option in fields(self):
            value = getattr(self, option.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"keep-{option.name}: expected a whole number of 0 or more, not {value!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Keep:
        """Build from `keep-<period>` options as a config file or a command line gives them
        (counts may be digit strings); an unknown option or a bad count is a ValueError."""
        counts = {}
        for name, value in options.items():
            option = name.removeprefix("keep-")
            if option == name or option not in OPTIONS:
                raise ValueError(f"unknown retention option {name!r}: expected one of "
                                 f"{', '.join('keep-' + o for o in OPTIONS)}")
            counts[option] = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
        return cls(**counts)  # type: ignore[arg-type]  # __post_init__ checks every count

    @property
    def keeps_something(self) -> bool:
        return any(getattr(self, option) for option in OPTIONS)


AHEAD = timedelta(minutes=10)  # a backup dated further past now was stamped by a clock that ran ahead


@dataclass(frozen=True)
class Candidate:
    id: str
    time: datetime  # timezone-aware
    protected: bool = False
    failed: bool = False  # its last verify found it damaged
    made: datetime | None = None  # when its writer began, by the clock of the node that made it

    @property
    def period_time(self) -> datetime:
        """The time its periods (day, week, ...) are taken from: its id's, but where the id is
        dated past when it was made (the guest's backup before it was stamped by a clock that
        ran ahead, and ids follow the newest), when it was made: else, once time catches up,
        those nights would share the day of the one stamped ahead, and keep-daily keep one of
        them."""
        return self.made if self.made is not None and self.time - self.made > AHEAD else self.time


def candidate(snapshot: Snapshot) -> Candidate:
    """A committed snapshot as prune and sync weigh it."""
    from drivers.backup.records import parse_time

    verify = snapshot.state.verify
    return Candidate(str(snapshot.id), snapshot.id.time, snapshot.state.protected,
                     failed=verify is not None and not verify.ok, made=parse_time(snapshot.manifest.started))


@dataclass(frozen=True)
class Decision:
    id: str
    keep: bool
    reason: str


class _Mark(enum.Enum):
    PROTECTED = "protected"
    KEEP = "keep"
    REMOVE = "remove"


def _iso_week(when: datetime) -> str:
    year, week, _ = when.isocalendar()
    return f"{year}/{week:02d}"  # the ISO year: 2021-01-03 is in week 53 of 2020


_PERIODS: dict[str, Callable[[Candidate], str]] = {
    "last": lambda b: b.id,
    "hourly": lambda b: b.period_time.strftime("%Y/%m/%d/%H"),
    "daily": lambda b: b.period_time.strftime("%Y/%m/%d"),
    "weekly": lambda b: _iso_week(b.period_time),
    "monthly": lambda b: b.period_time.strftime("%Y/%m"),
    "yearly": lambda b: b.period_time.strftime("%Y"),
}


def plan(backups: Sequence[Candidate], keep: Keep, now: datetime | None = None) -> list[Decision]:
    """What to do with each backup of one guest, newest first. Where one is dated more than
    AHEAD past `now` (a node's clock ran ahead when it was made), every later backup of the
    guest is dated just after it (ids follow the newest, which keeps them in the order they were
    made), so the retention's periods cannot be told apart: all are kept, naming it, until time
    catches up or those backups are forgotten by hand."""
    ordered = _newest_first(backups)
    if not keep.keeps_something:
        return [Decision(b.id, True, "no retention options given") for b in ordered]
    if ahead := [b for b in ordered if b.time > (now or datetime.now(UTC)) + AHEAD]:
        why = (f"kept: backup {ahead[-1].id} is dated past this node's clock (the clock of its node ran ahead), "
               "and the backups after it are dated after it: nothing of this guest is pruned until their time "
               "has come, or they are forgotten")
        return [Decision(b.id, True, why) for b in ordered]
    marks: dict[str, tuple[_Mark, str]] = {}
    for option in OPTIONS:
        if count := getattr(keep, option):
            _apply(option, count, ordered, marks)
    return [_decide(b, marks.get(b.id)) for b in ordered]


def _newest_first(backups: Sequence[Candidate]) -> list[Candidate]:
    seen: set[str] = set()
    for backup in backups:
        if backup.time.tzinfo is None:
            raise ValueError(f"backup {backup.id}: its time has no time zone")
        if backup.id in seen:
            raise ValueError(f"backup {backup.id} is listed twice")
        seen.add(backup.id)
    utc = [Candidate(b.id, b.time.astimezone(UTC), b.protected, b.failed, b.made and b.made.astimezone(UTC))
           for b in backups]
    return sorted(utc, key=lambda b: b.time, reverse=True)


def _apply(option: str, count: int, ordered: list[Candidate], marks: dict[str, tuple[_Mark, str]]) -> None:
    """One rule's walk (PBS's mark_selections)."""
    period = _PERIODS[option]
    covered = {period(b) for b in ordered if marks.get(b.id, (None,))[0] is _Mark.KEEP}
    taken: dict[str, str] = {}  # period -> the backup this walk kept for it
    for backup in ordered:
        if backup.id in marks:
            continue
        if backup.protected or backup.failed:
            marks[backup.id] = (_Mark.PROTECTED, "protected")
            continue
        slot = period(backup)
        if slot in covered:
            continue
        if slot in taken:
            marks[backup.id] = (_Mark.REMOVE, f"keep-{option}: {slot} is kept by the newer {taken[slot]}")
            continue
        if len(taken) >= count:
            break
        taken[slot] = backup.id
        marks[backup.id] = (_Mark.KEEP, f"keep-{option} {len(taken)}/{count}")


def _decide(backup: Candidate, mark: tuple[_Mark, str] | None) -> Decision:
    if backup.protected:
        return Decision(backup.id, True, "protected")
    if backup.failed:
        return Decision(backup.id, True, "its verify failed: kept, not counted (forget it by hand)")
    if mark is None:
        return Decision(backup.id, False, "kept by no retention option")
    return Decision(backup.id, mark[0] is not _Mark.REMOVE, mark[1])
