"""Prune decisions follow Proxmox Backup Server's keep-* rules (pbs-datastore prune.rs)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from drivers.backup.retention import Candidate, Decision, Keep, plan


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def candidates(times: list[str], protected: frozenset[str] = frozenset(),
               failed: frozenset[str] = frozenset()) -> list[Candidate]:
    """Backups named by their times (ids are the time strings), given in a shuffled order."""
    found = [Candidate(t, at(t), t in protected, t in failed) for t in times]
    random.Random(len(times)).shuffle(found)
    return found


def kept(decisions: list[Decision]) -> set[str]:
    return {d.id for d in decisions if d.keep}


HOURLY = ["2019-11-15T09:39:15Z", "2019-11-15T10:49:15Z", "2019-11-15T10:59:15Z",
          "2019-11-15T11:39:15Z", "2019-11-15T11:49:15Z", "2019-11-15T11:59:15Z"]
SPREAD = ["2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z", "2019-11-21T11:59:15Z", "2019-11-22T11:59:15Z",
          "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z",
          "2019-12-04T11:59:15Z"]
FOUR = ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z"]
# 2020-12-31 (Thursday) up to 2021-01-03 (Sunday) are ISO week 53 of 2020; 2021-01-04 starts 2021's week 1
NEW_YEAR_2021 = ["2020-12-31T12:00:00Z", "2021-01-01T12:00:00Z", "2021-01-03T12:00:00Z", "2021-01-04T12:00:00Z"]
# 2024-12-30 (Monday) is in ISO week 1 of 2025, 2024-12-29 (Sunday) in week 52 of 2024
NEW_YEAR_2025 = ["2024-12-29T12:00:00Z", "2024-12-30T12:00:00Z", "2025-01-05T12:00:00Z"]

CASES = [
    # (description, backups, protected ids, keep, ids kept[, ids whose verify failed])
    ("keep-last 4 of 4 keeps all", FOUR, (), Keep(last=4), set(FOUR)),
    ("keep-last 3 drops the oldest", FOUR, (), Keep(last=3), set(FOUR[1:])),
    ("keep-last 1 keeps the newest", FOUR, (), Keep(last=1), {FOUR[3]}),
    ("keep-hourly 3 keeps each hour's newest", HOURLY, (), Keep(hourly=3),
     {"2019-11-15T09:39:15Z", "2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"}),
    ("keep-hourly 2 stops after two hours", HOURLY, (), Keep(hourly=2),
     {"2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"}),
    ("keep-daily 3 keeps one a day", FOUR, (), Keep(daily=3), set(FOUR) - {"2019-12-04T11:59:15Z"}),
    ("keep-daily 2", FOUR, (), Keep(daily=2), {"2019-12-03T11:59:15Z", "2019-12-04T12:59:15Z"}),
    ("keep-daily 1", SPREAD, (), Keep(daily=1), {"2019-12-04T11:59:15Z"}),
    ("keep-weekly 5 within one week keeps one", FOUR, (), Keep(weekly=5), {FOUR[3]}),
    ("keep-monthly 6 within one month keeps one", FOUR, (), Keep(monthly=6), {FOUR[3]}),
    ("keep-yearly 7 within one year keeps one", FOUR, (), Keep(yearly=7), {FOUR[3]}),
    ("weekly, monthly and yearly within one week keep one", FOUR, (), Keep(weekly=5, monthly=6, yearly=7), {FOUR[3]}),
    ("keep-last and keep-daily together keep all", FOUR, (), Keep(last=2, daily=2), set(FOUR)),
    ("keep-daily does not count the day keep-last covered", SPREAD, (), Keep(last=1, daily=1),
     {"2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"}),
    ("keep-daily removes the same day's older backup before keep-weekly looks", FOUR, (), Keep(daily=1, weekly=5),
     {FOUR[3]}),
    ("keep-weekly takes the previous week", SPREAD, (), Keep(daily=1, weekly=1),
     {"2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"}),
    ("a backup removed by keep-weekly is not kept by keep-monthly", SPREAD, (), Keep(daily=1, weekly=1, monthly=1),
     {"2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"}),
    ("keep-yearly reaches back a year", SPREAD, (), Keep(monthly=1, yearly=1),
     {"2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"}),
    ("a protected backup is kept whatever the rules say", FOUR, {"2019-12-02T11:59:15Z"}, Keep(last=1),
     {"2019-12-02T11:59:15Z", "2019-12-04T12:59:15Z"}),
    ("a protected backup does not use up a keep-last slot", FOUR, {"2019-12-04T12:59:15Z"}, Keep(last=2),
     set(FOUR[1:])),
    ("a protected backup does not cover its day for keep-daily", FOUR, {"2019-12-04T12:59:15Z"}, Keep(daily=1),
     {"2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z"}),
    ("ISO weeks: the days around new year 2021 are one week of 2020", NEW_YEAR_2021, (), Keep(weekly=2),
     {"2021-01-03T12:00:00Z", "2021-01-04T12:00:00Z"}),
    ("calendar years: keep-yearly splits them at 1 January", NEW_YEAR_2021, (), Keep(yearly=2),
     {"2020-12-31T12:00:00Z", "2021-01-04T12:00:00Z"}),
    ("ISO weeks: 2024-12-30 belongs to 2025's first week", NEW_YEAR_2025, (), Keep(weekly=3),
     {"2024-12-29T12:00:00Z", "2025-01-05T12:00:00Z"}),
    ("no backups", [], (), Keep(last=3), set()),
    ("a backup whose verify failed is kept and does not use up a keep-last slot", FOUR, (), Keep(last=1),
     {FOUR[2], FOUR[3]}, {FOUR[3]}),
    ("a backup whose verify failed does not cover its day for keep-daily", FOUR, (), Keep(daily=1),
     {FOUR[2], FOUR[3]}, {FOUR[3]}),
    ("with every backup failed, all are kept", FOUR, (), Keep(last=1), set(FOUR), set(FOUR)),
    ("all options 0 keep everything", SPREAD, (), Keep(), set(SPREAD)),
]


@pytest.mark.parametrize(("what", "times", "protected", "keep", "expected", "failed"),
                         [(*c, ()) if len(c) == 5 else c for c in CASES], ids=[c[0] for c in CASES])
def test_prune_table(what, times, protected, keep, expected, failed):
    """Each case's surviving backups are exactly those PBS's rules keep, in any input order
    (and those whose verify failed, kept and not counted, as PBS does not)."""
    decisions = plan(candidates(times, frozenset(protected), frozenset(failed)), keep)
    assert kept(decisions) == expected
    assert sorted(d.id for d in decisions) == sorted(times)


def test_decisions_come_newest_first_with_a_reason_for_each():
    """The plan lists backups newest first and says which rule (and which slot) kept each one."""
    decisions = plan(candidates(FOUR), Keep(daily=2))
    assert decisions == [
        Decision("2019-12-04T12:59:15Z", True, "keep-daily 1/2"),
        Decision("2019-12-04T11:59:15Z", False, "keep-daily: 2019/12/04 is kept by the newer 2019-12-04T12:59:15Z"),
        Decision("2019-12-03T11:59:15Z", True, "keep-daily 2/2"),
        Decision("2019-12-02T11:59:15Z", False, "kept by no retention option"),
    ]


def test_protected_and_unconfigured_reasons():
    """A protected backup says so; with no options at all every backup says why it stays."""
    assert plan(candidates(FOUR, frozenset({FOUR[0]})), Keep(last=1))[-1] == Decision(FOUR[0], True, "protected")
    assert {d.reason for d in plan(candidates(FOUR), Keep())} == {"no retention options given"}


def test_periods_are_taken_in_utc():
    """A time given with an offset counts on its UTC day: 01:30 at +02:00 is the day before."""
    backups = [Candidate("a", at("2026-01-01T10:00:00Z")), Candidate("b", at("2026-01-02T01:30:00+02:00")),
               Candidate("c", at("2025-12-31T12:00:00Z"))]
    assert kept(plan(backups, Keep(daily=2))) == {"b", "c"}


BAD_KEEPS = [
    ("negative", {"last": -1}, "keep-last"),
    ("fraction", {"daily": 1.5}, "keep-daily"),
    ("text", {"weekly": "3"}, "keep-weekly"),
    ("boolean", {"yearly": True}, "keep-yearly"),
    ("none", {"monthly": None}, "keep-monthly"),
]


@pytest.mark.parametrize(("what", "values", "option"), BAD_KEEPS, ids=[b[0] for b in BAD_KEEPS])
def test_a_bad_count_is_refused_naming_its_option(what, values, option):
    """Counts are whole numbers of 0 or more; the error names the option that is wrong."""
    with pytest.raises(ValueError, match=option):
        Keep(**values)


def test_options_parse_from_config_text():
    """keep-<period> options from a config file or command line, counts as digit strings or ints."""
    assert Keep.from_options({"keep-daily": "7", "keep-last": 2}) == Keep(last=2, daily=7)
    with pytest.raises(ValueError, match="unknown retention option 'keep-dayly'"):
        Keep.from_options({"keep-dayly": 1})
    with pytest.raises(ValueError, match="unknown retention option 'daily'"):
        Keep.from_options({"daily": 1})
    with pytest.raises(ValueError, match="keep-weekly"):
        Keep.from_options({"keep-weekly": "-1"})


def test_bad_candidates_are_refused():
    """A time without a zone, or one backup listed twice, is a caller's mistake, not a plan."""
    with pytest.raises(ValueError, match="no time zone"):
        plan([Candidate("a", datetime(2026, 1, 1))], Keep(last=1))
    twice = Candidate("a", datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="listed twice"):
        plan([twice, twice], Keep(last=1))


@pytest.mark.parametrize(("newest", "pruned"), [
    ("2026-11-05T02:09:00Z", True),  # 9 minutes past the clock: a clock's drift, not a wrong clock
    ("2026-11-05T02:11:00Z", False),  # past AHEAD: every later backup is dated just after it
    ("2027-11-04T02:00:00Z", False),  # a year ahead, as a node whose clock was set a year on made it
])
def test_nothing_is_pruned_while_a_backup_is_dated_past_the_clock(newest, pruned):
    """A backup stamped by a node whose clock ran ahead dates every later one just after it
    (ids follow the newest): their periods cannot be told apart, and keep-daily would take ten
    nights for one. While the newest is dated more than AHEAD past now, all are kept, naming it."""
    now = at("2026-11-05T02:00:00Z")
    nights = [f"2026-11-0{d}T02:00:00Z" for d in range(1, 5)] + [newest]
    decisions = plan(candidates(nights), Keep(last=1), now=now)
    assert (kept(decisions) == {newest}) is pruned
    if not pruned:
        assert kept(decisions) == set(nights)
        assert all(f"backup {newest} is dated past this node's clock" in d.reason for d in decisions)


def test_once_time_catches_up_the_nights_dated_after_one_stamped_ahead_count_for_their_own_days():
    """The night of Nov 8 was backed up on a node three days ahead (its id: Nov 11), and the
    nights of Nov 9 and 10, on nodes with the right clock, got ids just after it. On Nov 11,
    with time caught up, keep-daily 7 takes each of those for the day it was made (its
    manifest's start): before, all three fell on Nov 11 with the real one, and were pruned."""
    nights = [(f"2026-11-0{d}T02:00:00Z", f"2026-11-0{d}T02:00:00Z") for d in range(1, 8)]
    nights += [("2026-11-11T02:00:00Z", "2026-11-11T02:00:00Z"),  # Nov 8's, by the clock ahead
               ("2026-11-11T02:00:01Z", "2026-11-09T02:00:00Z"), ("2026-11-11T02:00:02Z", "2026-11-10T02:00:00Z"),
               ("2026-11-11T02:00:30Z", "2026-11-11T02:00:30Z")]
    backups = [Candidate(id, at(id), made=at(made)) for id, made in nights]
    decisions = plan(backups, Keep(daily=7), now=at("2026-11-11T02:05:00Z"))
    assert kept(decisions) == {"2026-11-11T02:00:30Z", "2026-11-11T02:00:02Z", "2026-11-11T02:00:01Z",
                               "2026-11-07T02:00:00Z", "2026-11-06T02:00:00Z", "2026-11-05T02:00:00Z",
                               "2026-11-04T02:00:00Z"}  # Nov 8's own day cannot be known: it counts for the 11th
