"""How a job's result reads in text, the one way every command shows it: each value rendered by
what its key holds (bytes as KiB/MiB/GiB, lists one per line, mappings as NAME = VALUE lines,
prune decisions as a table), never a Python repr; an empty value is left out. `--json` keeps
the raw values (worker/context.py `set_result` writes them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from producer.tables import size, table, text, when

INDENT = "  "

BYTES = frozenset({"size", "written", "bytes_removed"})
TIMES = frozenset({"removable_after"})  # epoch seconds
# keys whose value is a list of names, or a mapping of names (a disk slot to a volume, a backup
# to its state): every one a line of its own
LISTS = frozenset({"freed", "freed_replicas", "forgotten", "replicas", "exported", "copied", "mended", "guests",
                   "gone"})
MAPPINGS = frozenset({"disks", "volumes", "bases", "detached", "removed", "replaced", "reads", "verified", "kept"})
SCALARS = frozenset({
    "vmid", "node", "template", "volid", "unlocked", "lock", "job", "backup", "storage", "warning", "destroyed",
    "dry_run", "pruned", "present", "chunks_too_new", "chunks_removed", "chunks_kept", "partials_removed",
    "bad_chunks_removed", "bad_chunks_restored", "forgot", "not_run",
})
# what a job made: a job that failed or was cancelled never committed, so its undo removed these
MADE = frozenset({"volumes", "disks", "bases", "replicas", "exported"})
# what the ping job records: the node that ran each of its steps
PING_STEPS = frozenset({"pong_node", "pong_back", "pong_shared"})


def _decisions(value: Any) -> list[str]:
    return table(["ID", "ACTION", "WHY"], [[d["id"], "keep" if d["keep"] else "remove", d["reason"]]
                                           for d in value]).splitlines()


TABLES: dict[str, Callable[[Any], list[str]]] = {"decisions": _decisions}  # shown under their key
KNOWN: frozenset[str] = BYTES | TIMES | LISTS | MAPPINGS | SCALARS | PING_STEPS | frozenset(TABLES)


def _lines(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        width = max((len(str(k)) for k in value), default=0)
        return [f"{k!s:<{width}} = {text(v)}" for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [text(v) for v in value]
    return [text(value)]


def render_value(key: str, value: Any) -> list[str]:
    """The lines one result value reads as (several for a list, a mapping or a table)."""
    if key in TABLES:
        return TABLES[key](value)
    if key in BYTES and isinstance(value, int) and not isinstance(value, bool):
        return [size(value)]
    if key in TIMES and isinstance(value, int | float) and not isinstance(value, bool):
        return [when(value)]
    if key in LISTS or key in MAPPINGS:
        return _lines(value)
    return [text(value)]


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, list | tuple | dict) and not value)


def render(result: Mapping[str, Any], indent: str = INDENT) -> list[str]:
    """A result as `key: value` lines, a value of several lines aligned under its first, a
    table below its key. Keys read as words (chunks_kept: chunks kept)."""
    shown = [(key, key.replace("_", " "), render_value(key, value))
             for key, value in result.items() if not _empty(value)]
    width = max((len(label) for key, label, _ in shown if key not in TABLES), default=0)
    out: list[str] = []
    for key, label, lines in shown:
        if key in TABLES:
            out += [f"{indent}{label}:", *(f"{indent}{INDENT}{line}" for line in lines)]
            continue
        out.append(f"{indent}{label + ':':<{width + 1}} {lines[0]}")
        out += [f"{indent}{' ' * (width + 2)}{line}" for line in lines[1:]]
    return out


def split_undone(result: Mapping[str, Any], stands: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what stands, what the undo removed): of a job whose undo ran back past everything it
    made (`stands` False: producer/views.undone), what it had made (MADE) was undone; what it
    found (a verify's states, a warning) stands either way."""
    if stands:
        return dict(result), {}
    return ({k: v for k, v in result.items() if k not in MADE}, {k: v for k, v in result.items() if k in MADE})
