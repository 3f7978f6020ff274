"""A schedule's crontab line, parsed by Celery's own parser (what beat's ticks match against),
so a line is checked the same way when a node starts, when `stork schedule list` shows it,
and at every tick."""

from __future__ import annotations

from celery.schedules import crontab

from drivers.config import Config
from drivers.errors import ConfigError


def parse_line(line: str) -> crontab:
    """The crontab of a five-field line (the config checked the count); ValueError naming
    what Celery found wrong. Celery raises ValueError or its own ParseException, which is not
    one; any error of its parser is this line's alone, never the other schedules'."""
    minute, hour, day_of_month, month, day_of_week = line.split()
    try:
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                       day_of_week=day_of_week)
    except Exception as e:
        raise ValueError(str(e) or type(e).__name__) from None


def line_errors(cfg: Config) -> dict[str, ConfigError]:
    """Each schedule whose crontab line does not parse, with its error naming the key."""
    errors = {}
    for name, entry in sorted(cfg.schedules.items()):
        try:
            parse_line(entry["schedule"])
        except ValueError as e:
            key = name if name.startswith("sync.") else f"schedule.{name}"  # a [sync.<name>] is named as written
            errors[name] = ConfigError(f"{cfg.file}: {key}.schedule = {entry['schedule']!r}: {e}")
    return errors
