"""What `--help` shows: every command's forms with an example, and no internal name (the
parser's template-copy is `template copy`, backup-run is `backup VMID`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from producer import cli

Parsers = dict[tuple[str, ...], argparse.ArgumentParser]


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Parsers:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found |= _leaves(child, (*words, name))
            return found
    return {words: parser}


LEAVES = _leaves(cli.build_parser())


def test_every_command_has_an_example():
    # a top-level name with a dash is the second word of another (template-copy: `template copy`);
    # in a group, a dash is part of the command's name (`guest import-pve`)
    shown = {" ".join([words[0].replace("-", " "), *words[1:]]) for words in LEAVES}
    assert shown == set(cli.EXAMPLES), (shown ^ set(cli.EXAMPLES))


@pytest.mark.parametrize("words", sorted(LEAVES), ids=[" ".join(w) for w in sorted(LEAVES)])
def test_a_commands_help_ends_with_its_example(words):
    text = LEAVES[words].format_help()
    assert "\nexample:\n  stork " in text and "-" not in LEAVES[words].prog.removeprefix("stork").split()[0]


def _child(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> argparse.ArgumentParser:
    for word in words:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


@pytest.mark.parametrize("words", sorted(LEAVES), ids=[" ".join(w) for w in sorted(LEAVES)])
def test_the_parser_built_for_one_command_parses_and_helps_as_the_whole(words):
    """main() builds only the parser of the command the line names: that one is whole."""
    alone = cli.build_parser(words[0])
    assert _child(alone, words).format_help() == LEAVES[words].format_help()
    assert _child(alone, words).format_usage() == LEAVES[words].format_usage()


@pytest.mark.parametrize("only", [None, "job", "template-copy"])
def test_the_top_help_is_the_same_whatever_command_is_built(only):
    assert cli.build_parser(only).format_help() == cli.build_parser().format_help()


def test_a_line_naming_no_known_command_is_refused_as_before(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--json", "nosuch"])
    assert stop.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err


LINES = [
    ["job", "list", "--limit", "3"], ["--json", "job", "list"], ["--config", "x.toml", "job", "list"],
    ["--conf", "x.toml", "job", "list"], ["--c", "x.toml", "ping"], ["--co=x.toml", "gc"],
    ["--config=x.toml", "--json", "backup-run", "100"], ["template-copy", "100", "101", "--storage", "s"],
    ["clone", "100", "101", "--json", "--config", "y.toml"], ["--no-w", "guest", "destroy", "100"],
    ["--conf", "x.toml", "--js", "template-copy", "1", "2"],
]


@pytest.mark.parametrize("argv", LINES, ids=[" ".join(a) for a in LINES])
def test_a_line_parses_as_the_whole_parser_parses_it(argv):
    """Global flags before the command, abbreviated or not, with or without `=`: the parser
    built for the command found parses the line as the whole parser does."""
    assert _plain(cli._parse(argv)) == _plain(cli.build_parser().parse_args(argv))


def _plain(args: argparse.Namespace) -> dict:
    """The parsed values, the handler named by what it is (a submitter is made per parser)."""
    handler = args.handler
    cells = tuple(c.cell_contents for c in handler.__closure__ or ())
    return {**vars(args), "handler": (handler.__qualname__, cells)}


@pytest.mark.parametrize("argv", [["--conf", "x.toml", "job", "--help"], ["job", "list", "--bogus"],
                                  ["--c", "x.toml", "job"]])
def test_a_line_the_parser_refuses_or_helps_with_ends_as_with_the_whole_parser(argv, capsys):
    with pytest.raises(SystemExit) as alone:
        cli._parse(argv)
    said = capsys.readouterr()
    with pytest.raises(SystemExit) as whole:
        cli.build_parser().parse_args(argv)
    assert alone.value.code == whole.value.code and said == capsys.readouterr()


def test_the_command_word_is_found_after_the_global_flags():
    assert cli._command_word(["--json", "--config", "x.toml", "job", "list"]) == "job"
    assert cli._command_word(["--config=x.toml", "backup-run", "100"]) == "backup-run"
    assert cli._command_word(["--conf", "x.toml", "job"]) == cli._command_word(["--c", "x", "job"]) == "job"
    assert cli._command_word(["--json"]) is None and cli._command_word([]) is None


def test_the_top_help_names_no_internal_command():
    text = cli.build_parser().format_help()
    assert "template-" not in text and "backup-run" not in text and "COMMAND" in text


def test_backup_and_templates_show_all_their_forms():
    parser = cli.build_parser()
    backup = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["backup"]
    assert "stork backup VMID..." in backup.format_help() and "stork backup --all" in backup.format_help()
    template = LEAVES[("template",)].format_help()
    assert "stork template assemble VMID" in template and "stork template copy VMID NEWID" in template


def test_help_imports_no_heavy_module():
    """`stork --help` starts at once: it loads neither Celery, kombu, Redis's client, nor
    cryptography or a storage backend, nor what only a command needs (json, logging, typing,
    the name checks; measured in bench/cli.py)."""
    import subprocess
    import sys

    probe = ("import sys, contextlib\nfrom producer import cli\nwith contextlib.suppress(SystemExit):\n"
             "    cli.main(['--help'])\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', 'redis', 'cryptography',"
             " 'structlog', 'json', 'logging', 'typing', 'dataclasses'}),"
             " sorted({'drivers.backends.dir', 'drivers.names', 'drivers.backup.retention'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parent,
                          check=True, env={"PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])})
    assert done.stdout.strip().splitlines()[-1] == "[] []", done.stdout


@pytest.mark.parametrize(("argv", "message"), [
    # an empty value (an unset variable in a script) meant the default: another cluster's config, every interface
    (["--config", "", "job", "list"], "argument --config: invalid value '': expected a config file"),
    (["backup", "serve", "vm/100/2026-01-01T00:00:00Z", "scsi0", "--address", ""],
     "argument --address: invalid value '': expected an address to listen on"),
    (["backup", "serve", "vm/100/2026-01-01T00:00:00Z", "scsi0", "--port", "70000"],  # a traceback before
     "argument --port: invalid value '70000': expected a port from 0 to 65535"),
    (["backup", "serve", "vm/100/2026-01-01T00:00:00Z", "scsi0", "--port", "-1"],
     "argument --port: invalid value '-1': expected a port from 0 to 65535"),
    (["job", "list", "--limit", "0"], "argument --limit: invalid value '0': expected a number of jobs from 1 to"),
    (["job", "list", "--limit", "9" * 30], "argument --limit: invalid value '999"),
    (["job", "dead", "--limit", "-5"], "argument --limit: invalid value '-5': expected a number of messages"),
    (["verify", "--all", "--reverify-after", "-3"], "argument --reverify-after: invalid value '-3': expected a number"),
    (["job", "list", "--limit", "+-5"], "argument --limit: invalid value '+-5': expected a number of jobs"),
    (["backup", "key", "create", ""], "argument FILE: invalid value '': expected a file to make"),  # "<cwd> exists"
    (["cluster", "key", ""], "argument FILE: invalid value '': expected a file to make"),
])
def test_a_bad_value_is_refused_by_the_parser_naming_the_option(argv, message, capsys):
    from producer.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("since", ["9" * 400 + "d", "0001-01-01", "yesterday"])
def test_a_since_out_of_range_is_a_usage_error_not_a_traceback(since):
    from producer.cli import UsageError, _since

    with pytest.raises(UsageError, match=r"invalid --since .*: expected an ISO date or time, or 30m, 2h, 3d"):
        _since(since)
