"""The text tables people read (producer/tables.py): aligned columns, never cut or wrapped."""

from __future__ import annotations

import pytest

from producer.tables import table


@pytest.mark.parametrize(("columns", "rows", "right", "expected"), [
    (["VMID", "NAME"], [[100, "web"], [1001, "db"]], [], "VMID  NAME\n100   web\n1001  db"),
    (["VMID", "DISKS"], [[100, 2], [101, 12]], ["DISKS"], "VMID  DISKS\n100       2\n101      12"),  # numbers right
    (["A", "B"], [["x", ""], ["", ""]], [], "A  B\nx"),  # trailing blanks and empty rows dropped
    (["NAME", "NODE"], [["日本", "n1"], ["ab", "n2"]], [], "NAME  NODE\n日本  n1\nab    n2"),  # wide: two columns
    (["NAME", "X"], [["e\u0301", "1"]], [], "NAME  X\ne\u0301     1"),  # a combining mark takes none
    (["WHY"], [["two\nlines"]], [], "WHY\ntwo lines"),  # one row stays one line
    (["A", "B", "C"], [["short"]], [], "A      B  C\nshort"),  # a short row is filled
    (["OK", "LIST"], [[True, [1, 2]], [None, []]], [], "OK   LIST\nyes  1, 2\n-    -"),  # values in words
    (["VMID"], [], [], "VMID"),
])
def test_a_table_aligns_its_columns(columns, rows, right, expected):
    assert table(columns, rows, right) == expected


def test_a_row_wider_than_the_header_is_a_bug_not_a_silent_cut():
    with pytest.raises(ValueError, match="a row of 3 cells under 2 columns"):
        table(["A", "B"], [[1, 2, 3]])


def test_ten_thousand_rows_are_ten_thousand_lines_under_one_header():
    """The guest list of 10,000 guests (bench/cli.py times it)."""
    rendered = table(["VMID", "NAME", "DISKS"], [[i, f"guest-{i}", 2] for i in range(10_000)], ["DISKS"])
    lines = rendered.splitlines()
    assert len(lines) == 10_001 and lines[0] == "VMID  NAME        DISKS" and lines[-1] == "9999  guest-9999      2"
