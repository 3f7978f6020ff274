"""The cluster config: every wrong key, type or value names the file, the key and what was expected."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from drivers import config
from drivers.errors import ConfigError, NotFound
from worker.testing import ROOT  # the checkout, for the CLI's subprocesses

GOOD = """
[redis]
url = "redis://127.0.0.1:6399/0"
[paths]
guests = "g"
locks = "l"
[storage.local]
type = "dir"
path = "images"
content = ["images"]
[storage.san]
type = "dir"
path = "/srv/san"
shared = true
[storage.n2]
type = "dir"
path = "n2"
nodes = ["node2"]
"""


def parse(text, env=None):
    return config.parse(text, Path("/etc/stork/stork.toml"), env or {"STORK_NODE": "node1"})


def test_a_good_config_resolves_relative_paths_against_its_own_directory():
    """Relative paths are relative to the config file, absolute ones stay."""
    cfg = parse(GOOD)
    assert cfg.guests_dir == Path("/etc/stork/g")
    assert cfg.storage("local").path == Path("/etc/stork/images")
    assert cfg.storage("san").path == Path("/srv/san")
    assert cfg.redis_url == "redis://127.0.0.1:6399/0"


def test_environment_overrides_redis_url_and_node():
    """STORK_REDIS_URL and STORK_NODE win over the file and the host name."""
    cfg = parse(GOOD, {"STORK_REDIS_URL": "redis://127.0.0.1:1/2", "STORK_NODE": "node7"})
    assert cfg.redis_url == "redis://127.0.0.1:1/2" and cfg.node == "node7"


def test_storages_know_which_nodes_they_exist_on():
    """A node-local storage with `nodes` exists only there; shared ones everywhere."""
    cfg = parse(GOOD)
    assert cfg.storage("n2").on_node("node2") and not cfg.storage("n2").on_node("node1")
    assert cfg.storage("san").on_node("node1") and cfg.storage("local").on_node("anything")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[redis]\nurl = 5\n", r"stork.toml: redis.url = 5: expected a redis://, rediss:// or unix:// URL"),
        ("[redis]\nurl = 'localhost:6379'\n", r"redis.url = 'localhost:6379': expected a redis://"),
        ("[flower]\nport = 70000\n", r"flower.port = 70000: expected a port number \(1-65535\)"),
        ("[flower]\naddress = 'example.org'\n", r"flower.address = 'example.org': expected an IP address"),
        ("[flower]\naddress = 5\n", r"flower.address = 5: expected an IP address"),  # ip_address(5) is 0.0.0.5
        ("[nodes.n2]\naddress = 5\n", r"nodes.n2.address = 5: expected an IP address"),
        ("[redis]\nhost = 'x'\n", r"stork.toml: unknown key redis.host"),
        ("[bogus]\n", r"unknown section \[bogus\]"),
        ("[storage.x]\ntype = 'nfs'\npath = 'p'\n",
         r"storage.x.type = 'nfs': expected one of: dir, btrfs, zfs, rbd, lvm"),
        ("[storage.x]\ntype = 'dir'\n", r"storage.x.path is missing \(dir storage needs a directory path\)"),
        ("[storage.x]\npath = 'p'\n", r"storage.x.type is missing"),
        ("[storage.x]\ntype = 'dir'\npath = 'p'\nvgname = 'vg0'\n",
         r"unknown key storage.x.vgname \(expected one of: type, content, shared, nodes, path, mkdir, is_mountpoint, "
         r"format, layout, pve_config, pve_locks\)"),
        ("[storage.x]\ntype = 'dir'\npath = 'p'\nlayout = 'vmware'\n",
         r"storage.x.layout = 'vmware': expected stork or pve"),
        ("[storage.x]\ntype = 'dir'\npath = 'p'\nlayout = 'pve'\npve_config = 'etc/pve'\n",
         r"storage.x.pve_config = 'etc/pve': expected an absolute path \(Proxmox VE's /etc/pve\) or false"),
        ("[storage.x]\ntype = 'dir'\npath = 'p'\nformat = 'vmdk'\n",
         r"storage.x.format = 'vmdk': expected the format of new volumes: raw or qcow2"),
        ("[storage.x]\ntype = 'dir'\npath = 'p'\nmkdir = 'yes'\n", r"storage.x.mkdir = 'yes': expected true or false"),
        ("[storage.x]\ntype = 5\npath = 'p'\n", r"storage.x.type = 5: expected one of: dir"),
        ("[storage]\nx = 5\n", r"\[storage.x\] must be a table"),
        ("[storage.z]\ntype = 'zfs'\n", r"storage.z.pool is missing \(zfs storage needs a pool or dataset name"),
        ("[storage.z]\ntype = 'zfs'\npool = '-f'\n", r"storage.z.pool = '-f': expected a pool or dataset name"),
        ("[storage.z]\ntype = 'zfs'\npool = 'tank/a b'\n", r"storage.z.pool = 'tank/a b': expected"),
        ("[storage.z]\ntype = 'zfs'\npool = 'tank/../x'\n", r"storage.z.pool = 'tank/../x': expected"),
        ("[storage.a]\ntype = 'zfs'\npool = 'tank/a'\n[storage.b]\ntype = 'zfs'\npool = 'tank'\n",
         r"storages 'a' and 'b' overlap: zfs:tank/a and zfs:tank \(a volume would have two ids"),
        ("[storage.a]\ntype = 'rbd'\npool = 'p'\n[storage.b]\ntype = 'rbd'\npool = 'p'\n",
         r"storages 'a' and 'b' overlap: rbd:/etc/ceph/ceph.conf:p: and rbd:/etc/ceph/ceph.conf:p:"),
        ("[storage.b]\ntype = 'dir'\npath = 'p'\ncontent = ['images', 'backup']\n",
         r"storage.b.content = \['images', 'backup'\]: a dir storage holds images \(backups go to a storage of "
         r"type = \"chunkstore\""),
        ("[storage.b]\ntype = 'chunkstore'\npath = 'p'\ncontent = ['images']\n",
         r"storage.b.content = \['images'\]: a chunkstore storage holds backup"),
        ("[storage.b]\ntype = 'chunkstore'\n", r"storage.b.path is missing \(chunkstore storage needs a directory"),
        ("[storage.b]\ntype = 'chunkstore'\npath = 'p'\npool = 'x'\n",
         r"unknown key storage.b.pool \(expected one of: type, content, shared, nodes, path, keyfile, is_mountpoint\)"),
        ("[storage.t]\ntype = 'lvmthin'\nvgname = 'vg0'\n",
         r"storage.t.thinpool is missing \(lvmthin storage needs the name of a thin pool LV"),
        ("[storage.t]\ntype = 'lvmthin'\nvgname = 'vg0'\nthinpool = '-x'\n", r"storage.t.thinpool = '-x': expected"),
        ("[storage.a]\ntype = 'lvm'\nvgname = 'vg0'\n[storage.b]\ntype = 'lvmthin'\nvgname = 'vg0'\nthinpool = 'p'\n",
         r"storages 'a' and 'b' overlap: lvm:vg0 and lvm:vg0 \(a volume would have two ids"),
        ("[storage.r]\ntype = 'rbd'\npool = 'p'\nshared = false\n",
         r"storage.r.shared = false: rbd storage is seen by every node"),
        ("[storage.r]\ntype = 'rbd'\npool = 'p'\nnodes = ['n1']\n", r"storage.r.nodes: expected no nodes on a shared"),
        ("[storage.z]\ntype = 'zfs'\npool = 'tank'\npath = 'p'\n",
         r"unknown key storage.z.path \(expected one of: type, content, shared, nodes, pool\)"),
        ("[storage.x]\ntype = 'dir'\npath='p'\nshared = 'yes'\n", r"storage.x.shared = 'yes': expected true or false"),
        ("[storage.x]\ntype = 'dir'\npath='p'\ncontent = ['isos']\n", r"storage.x.content"),
        ("[storage.Bad]\ntype = 'dir'\npath='p'\n", r"\[storage.Bad\]: invalid storage id"),
        ("[locks]\ntimeout = -1\n", r"locks.timeout = -1: expected a number of seconds > 0"),
        ("[locks]\ntimeout = 0\n", r"locks.timeout = 0: expected a number of seconds > 0 and <= 3600"),
        ("[locks]\ntimeout = inf\n", r"locks.timeout = inf: expected a number of seconds > 0 and <= 3600"),
        ("[locks]\ntimeout = nan\n", r"locks.timeout = nan: expected a number of seconds > 0 and <= 3600"),
        ("[locks]\ntimeout = 3601\n", r"locks.timeout = 3601: expected a number of seconds > 0 and <= 3600"),
        ("[locks]\ntimeout = true\n", r"locks.timeout = True: expected a number of seconds"),
        ("[worker]\nconcurrency = 0\n", r"worker.concurrency = 0: expected a whole number from 1 to 256"),
        ("[worker]\nconcurrency = 99999999\n", r"worker.concurrency = 99999999: expected a whole number from 1 to 256"),
        ("[worker]\nvisibility_timeout = 1\n", r"worker.visibility_timeout = 1: expected a whole number of seconds "
         r"from 600 \(a task must fit in 0.8x of it\) to 604800 \(7 days\)"),
        ("[worker]\nvisibility_timeout = 604801\n", r"worker.visibility_timeout = 604801: expected a whole number"),
        ("[worker]\nvisibility_timeout = 3600.5\n", r"worker.visibility_timeout = 3600.5: expected a whole number"),
        ("[jobs]\nkeep_days = 0\n", r"jobs.keep_days = 0: expected a whole number of days from 1 to 3650"),
        ("[jobs]\nkeep_days = 3651\n", r"jobs.keep_days = 3651: expected a whole number of days from 1 to 3650"),
        ("[jobs]\nkeep_days = 1.5\n", r"jobs.keep_days = 1.5: expected a whole number of days"),
        ("[jobs]\nkeep = 5\n", r"unknown key jobs.keep \(expected one of: keep_days\)"),
        ("[storage.x]\ntype = 'dir'\npath='p'\nnodes = ['N1!']\n",
         r"storage.x.nodes = \['N1!'\]: expected a non-empty list of distinct node names \(a lower-case letter"),
        ("[storage.x]\ntype = 'dir'\npath='p'\nnodes = ['node1', 'node1']\n",
         r"storage.x.nodes = \['node1', 'node1'\]: expected a non-empty list of distinct node names"),
        ("[storage.x]\ntype = 'dir'\npath='p'\nnodes = []\n", r"storage.x.nodes = \[\]: expected a non-empty list"),
        ("[storage.x]\ntype = 'dir'\npath='p'\nshared = true\nnodes = ['node1']\n",
         r"storage.x.nodes: expected no nodes on a shared storage \(it exists on every node"),
        ("[storage.x]\ntype = 'dir'\npath='p'\ncontent = []\n",
         r"storage.x.content = \[\]: expected a non-empty list of \"images\", \"backup\""),
        ("[storage.x]\ntype = 'dir'\npath=''\n", r"storage.x.path = '': expected a directory path"),
        ('[storage.x]\ntype = "dir"\npath = "p\\u0000"\n', r"storage.x.path = 'p\\x00': expected a directory path"),
        ("[paths]\nguests = ''\n", r"paths.guests = '': expected a directory path"),
        ('[paths]\nlocks = "l\\u0000"\n', r"paths.locks = 'l\\x00': expected a directory path"),
        ("[redis]\nurl = 'redis://127.0.0.1:99999/0'\n", r"redis.url = 'redis://127.0.0.1:99999/0': expected a redis://"),
        ("[redis]\nurl = 'redis://127.0.0.1:0/0'\n", r"redis.url = 'redis://127.0.0.1:0/0': expected .*port 1-65535"),
        ("[redis]\nurl = 'redis://127.0.0.1/zero'\n", r"redis.url = 'redis://127.0.0.1/zero': expected .*database a"),
        ("[redis]\nurl = 'unix://'\n", r"redis.url = 'unix://': expected .*unix:// with a path"),
        ("[redis]\nurl = 'unix:///run/redis.sock?db=x'\n", r"redis.url = 'unix:///run/redis.sock\?db=x': expected"),
        ("[redis]\nurl = 'redis://:hunter2@h:x/0'\n", r"redis.url = 'redis://:\*\*\*@h:x/0': expected a redis://"),
        # redis-py takes a password from the query too: it escaped the readable-file check and every redaction
        ("[redis]\nurl = 'redis://h:1/0?password=hunter2'\n",
         r"redis.url = 'redis://h:1/0\?password=\*\*\*': expected .*no password in its query"),
        ("[redis]\nurl = 'unix:///run/redis.sock?db=1&Password=hunter2'\n",
         r"redis.url = 'unix:///run/redis.sock\?db=1&Password=\*\*\*': expected"),
        ("[redis]\nurl = 'rediss://h:1/0?%70assword=hunter2'\n", r"redis.url = 'rediss://h:1/0\?%70assword=\*\*\*'"),
        ("[redis]\nurl = 'rediss://h:1/0?ssl_password=hunter2'\n", r"redis.url = 'rediss://h:1/0\?ssl_password=\*\*\*'"),
        ("[flower]\nbasic_auth = 'admin'\n", r"flower.basic_auth = '\*\*\*': expected user:password\[,user:pass"),
        ("[flower]\nbasic_auth = 'a:b,:c'\n", r"flower.basic_auth = '\*\*\*': expected .*each with a user and a"),
        ("not toml [", r"not valid TOML"),
        ("[locks]\ntimeout = " + "9" * 5000 + "\n", r"stork.toml: not read: Exceeds the limit \(4300 digits\)"),
        ("[locks]\ntimeout = " + "9" * 400 + "\n", r"locks.timeout = 9999.*: expected"),
        ("x = " + "[" * 1000 + "]" * 1000 + "\n", r"stork.toml: not read: nested too deeply"),
    ],
)
def test_config_errors_name_file_key_and_expectation(text, message):
    """A wrong key, type or value is one ConfigError naming the file and the key."""
    with pytest.raises(ConfigError, match=message) as err:
        parse(text)
    assert "/etc/stork/stork.toml" in str(err.value)


def test_values_at_the_bounds_are_accepted():
    """The edges of every bound parse: a lock timeout of 3600 s, 1 and 256 processes, 600 s and 7 days."""
    for text in (
        "[locks]\ntimeout = 3600\n[worker]\nconcurrency = 1\nvisibility_timeout = 600\n",
        "[locks]\ntimeout = 0.5\n[worker]\nconcurrency = 256\nvisibility_timeout = 604800\n",
        "[jobs]\nkeep_days = 1\n", "[jobs]\nkeep_days = 3650\n",
        "[redis]\nurl = 'unix:///run/redis.sock'\n[flower]\nbasic_auth = 'a:b,c:d:e'\n",
        "[storage.x]\ntype = 'dir'\npath = 'p'\nnodes = ['node1', 'node-2_b']\n",
    ):
        parse(text)
    assert parse("[locks]\ntimeout = 0.5\n").lock_timeout == 0.5
    assert parse("[jobs]\nkeep_days = 7\n").job_keep_days == 7 and parse("").job_keep_days == 30


def test_a_bad_redis_url_from_the_environment_is_refused_without_its_password():
    """STORK_REDIS_URL is checked like the file's redis.url, and the error hides its password."""
    with pytest.raises(ConfigError) as err:
        parse("", {"STORK_NODE": "node1", "STORK_REDIS_URL": "redis://:hunter2@h:99999/0"})
    assert str(err.value).startswith("STORK_REDIS_URL = 'redis://:***@h:99999/0': expected a redis://")
    assert "hunter2" not in str(err.value)


def test_a_config_file_that_is_not_utf8_is_one_config_error(tmp_path):
    """Bytes that are not UTF-8 are a ConfigError naming the file, not a UnicodeDecodeError."""
    file = tmp_path / "stork.toml"
    file.write_bytes(b"[paths]\nguests = '\xff'\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(file))}: not valid TOML: not UTF-8 text"):
        config.load({"STORK_CONFIG": str(file), "STORK_NODE": "n"})


def test_unknown_storage_lists_the_configured_ones():
    """Naming a storage that is not configured says which ones are."""
    with pytest.raises(NotFound, match=r"unknown storage 'nope' \(configured: local, n2, san\)"):
        parse(GOOD).storage("nope")


def test_missing_config_file_says_how_to_get_one(tmp_path):
    """Without a config file the error names the path and how to write the default."""
    with pytest.raises(ConfigError, match="config file not found"):
        config.load({"STORK_CONFIG": str(tmp_path / "none.toml")})


def test_default_config_is_written_once_and_is_valid(tmp_path):
    """The default config parses and holds a `local` dir storage under ./var/."""
    file = tmp_path / "stork.toml"
    assert config.write_default(file) is True
    assert config.write_default(file) is False
    cfg = config.load({"STORK_CONFIG": str(file), "STORK_NODE": "n"})
    assert cfg.storage("local").path == tmp_path / "var" / "images"


def storages(*paths, guests="g", locks="l"):
    """A config with paths.guests, paths.locks and dir storages a, b, ... at `paths`."""
    text = f'[paths]\nguests = "{guests}"\nlocks = "{locks}"\n'
    for sid, path in zip("abcdefgh", paths, strict=False):
        text += f'[storage.{sid}]\ntype = "dir"\npath = "{path}"\n'
    return text


OVERLAP = "(a volume would have two ids; give each storage its own directory)"
GUESTS = "(the storage could list or free the guest configs; give each storage its own directory)"
LOCKS = "(the storage could list or free the lock files; give each storage its own directory)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            storages("img", "./img/"),
            f"storages 'a' and 'b' overlap: /etc/stork/img and /etc/stork/img {OVERLAP}",
            id="same-path-spelled-two-ways",
        ),
        pytest.param(
            storages("img", "/etc/stork/img"),
            f"storages 'a' and 'b' overlap: /etc/stork/img and /etc/stork/img {OVERLAP}",
            id="same-path-relative-and-absolute",
        ),
        pytest.param(
            storages("img", "img/sub"),
            f"storages 'a' and 'b' overlap: /etc/stork/img and /etc/stork/img/sub {OVERLAP}",
            id="second-inside-first",
        ),
        pytest.param(
            storages("img/sub", "other", "img/../img"),
            f"storages 'a' and 'c' overlap: /etc/stork/img/sub and /etc/stork/img {OVERLAP}",
            id="first-inside-a-later-one",
        ),
        pytest.param(
            storages("g"),
            f"storage 'a' and paths.guests overlap: /etc/stork/g and /etc/stork/g {GUESTS}",
            id="storage-is-the-guests-dir",
        ),
        pytest.param(
            storages("g/disks"),
            f"storage 'a' and paths.guests overlap: /etc/stork/g/disks and /etc/stork/g {GUESTS}",
            id="storage-inside-the-guests-dir",
        ),
        pytest.param(
            storages("var", guests="var/guests"),
            f"storage 'a' and paths.guests overlap: /etc/stork/var and /etc/stork/var/guests {GUESTS}",
            id="storage-contains-the-guests-dir",
        ),
        pytest.param(
            storages("img", "l"),
            f"storage 'b' and paths.locks overlap: /etc/stork/l and /etc/stork/l {LOCKS}",
            id="storage-is-the-locks-dir",
        ),
        pytest.param(
            storages("l/x"),
            f"storage 'a' and paths.locks overlap: /etc/stork/l/x and /etc/stork/l {LOCKS}",
            id="storage-inside-the-locks-dir",
        ),
        pytest.param(
            storages("run", locks="run/lock"),
            f"storage 'a' and paths.locks overlap: /etc/stork/run and /etc/stork/run/lock {LOCKS}",
            id="storage-contains-the-locks-dir",
        ),
    ],
)
def test_storages_sharing_a_directory_are_refused_naming_file_and_both_sides(text, message):
    """Storages equal or nested, or overlapping the guests or locks dir, are one ConfigError naming both."""
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert str(err.value) == f"/etc/stork/stork.toml: {message}"


def test_sibling_storages_with_a_common_prefix_are_accepted():
    """img and img2 share a name prefix, not a directory: both storages parse."""
    cfg = parse(storages("img", "img2", "g2", "l2", guests="g", locks="l"))
    assert cfg.storage("a").path == Path("/etc/stork/img")
    assert cfg.storage("b").path == Path("/etc/stork/img2")


def test_a_storage_reached_through_a_symlink_overlaps_its_target(tmp_path):
    """Paths are compared resolved, so a symlinked spelling of another storage is refused."""
    (tmp_path / "img").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "img")
    with pytest.raises(ConfigError, match=r"storages 'a' and 'b' overlap: .*/img and .*/img/sub \(a volume"):
        config.parse(storages("img", "alias/sub"), tmp_path / "stork.toml", {"STORK_NODE": "n"})


@pytest.mark.parametrize(
    ("paths", "pair"),
    [
        pytest.param({"a": Path("/x"), "b": Path("/x2")}, None, id="siblings-with-common-prefix"),
        pytest.param({"a": Path("/x"), "b": Path("/y"), "c": Path("/x")}, ("a", "c"), id="equal"),
        pytest.param({"a": Path("/x/y"), "b": Path("/x")}, ("a", "b"), id="first-inside-second"),
        pytest.param({"a": Path("/"), "b": Path("/srv")}, ("a", "b"), id="root-contains-everything"),
        pytest.param({"a": Path("/x")}, None, id="one-path"),
        pytest.param({}, None, id="no-paths"),
    ],
)
def test_overlaps_finds_the_first_pair_of_equal_or_nested_paths(paths, pair):
    """The pure decision: the first two names, in order, whose paths are equal or nested, else None."""
    assert config._overlaps(paths) == pair


def test_the_default_config_has_no_overlapping_directories(tmp_path):
    """DEFAULT_CONFIG's var/guests, var/lock and var/images are siblings, so it parses."""
    cfg = config.parse(config.DEFAULT_CONFIG, tmp_path / "stork.toml", {"STORK_NODE": "n"})
    assert (cfg.guests_dir, cfg.locks_dir) == (tmp_path / "var" / "guests", tmp_path / "var" / "lock")
    assert cfg.storage("local").path == tmp_path / "var" / "images"


def load_error(file: Path) -> str:
    with pytest.raises(ConfigError) as err:
        config.load({"STORK_CONFIG": str(file), "STORK_NODE": "n"})
    return str(err.value)


def test_a_config_path_that_is_a_directory_is_one_config_error(tmp_path):
    """STORK_CONFIG naming a directory: a ConfigError naming it, not IsADirectoryError."""
    assert load_error(tmp_path) == f"{tmp_path}: cannot read the config file: it is a directory, not a regular file"


def test_a_config_path_that_is_a_fifo_is_refused_at_once(tmp_path):
    """A FIFO (no writer) would block a plain open forever, and read as empty with one: refused, unread."""
    fifo = tmp_path / "stork.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert load_error(fifo) == f"{fifo}: cannot read the config file: it is a FIFO, not a regular file"
    assert time.monotonic() - started < 5


def test_a_device_is_never_taken_for_an_empty_config():
    """/dev/null reads as empty (a valid, empty TOML) and /dev/zero without end: both refused."""
    for device in ("/dev/null", "/dev/zero"):
        message = f"{device}: cannot read the config file: it is a character device, not a regular file"
        assert load_error(Path(device)) == message


def test_a_dangling_config_symlink_names_its_missing_target(tmp_path):
    """A symlink to nowhere is "not found", naming where it points; a good symlink is followed."""
    link = tmp_path / "stork.toml"
    link.symlink_to(tmp_path / "gone.toml")
    assert load_error(link) == f"{link}: config file not found: it is a symlink to {tmp_path / 'gone.toml'}, " \
                               "which does not exist"
    (tmp_path / "gone.toml").write_text(config.DEFAULT_CONFIG)
    assert config.load({"STORK_CONFIG": str(link), "STORK_NODE": "n"}).storage("local")


def _symlink_loop(d: Path) -> Path:
    (d / "loop.toml").symlink_to(d / "loop.toml")
    return d / "loop.toml"


def _below_a_file(d: Path) -> Path:
    (d / "file").write_text("")
    return d / "file" / "stork.toml"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(_symlink_loop, "Too many levels of symbolic links", id="symlink-loop"),
        pytest.param(_below_a_file, "Not a directory", id="path-through-a-file"),
    ],
)
def test_a_config_path_that_cannot_be_opened_is_one_config_error(tmp_path, make, reason):
    """Errors root meets too (root is not stopped by modes): each one line naming the file and why."""
    file = make(tmp_path)
    assert load_error(file) == f"{file}: cannot read the config file: {reason}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_an_unreadable_config_is_one_config_error_for_a_user_without_access():
    """A mode 0000 config, loaded by an unprivileged user (root reads it anyway): a ConfigError, EACCES.
    Loaded in a forked child that drops to nobody, as this checkout's Python may be out of nobody's reach."""
    public = Path(tempfile.mkdtemp(prefix="stork-cfg-"))  # not below tmp_path: its parents are 0700
    try:
        public.chmod(0o755)
        file = public / "stork.toml"
        file.write_text(config.DEFAULT_CONFIG)
        file.chmod(0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            try:
                os.setgid(65534)
                os.setuid(65534)
                config.load({"STORK_CONFIG": str(file), "STORK_NODE": "n"})
                os.write(write, b"loaded")
            except BaseException as e:
                os.write(write, f"{type(e).__name__}: {e}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with open(read, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        assert said == f"ConfigError: {file}: cannot read the config file: Permission denied"
    finally:
        shutil.rmtree(public)


def test_a_large_file_is_not_read_whole(tmp_path):
    """A file above 1 MiB is not a config (a log named by mistake): refused without reading it into memory."""
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    assert load_error(big) == f"{big}: cannot read the config file: larger than 1 MiB, not a config"


@pytest.mark.parametrize("url", ["http://x", "redis://h:99999/0", "redis://h/db"])
def test_a_bad_redis_url_in_the_environment_is_one_line_from_the_cli(tmp_path, url):
    """STORK_REDIS_URL=http://x through `stork storage list`: one line on stderr, exit 1, no traceback."""
    file = tmp_path / "stork.toml"
    file.write_text(config.DEFAULT_CONFIG)
    env = {**os.environ, "STORK_CONFIG": str(file), "STORK_REDIS_URL": url}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "storage", "list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (1, 2) and done.stdout == ""
    assert done.stderr.startswith(f"stork: STORK_REDIS_URL = {url!r}: expected a redis://")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_pools_and_namespaces_apart_are_separate_storages_and_rbd_is_shared():
    """Two RBD namespaces of one pool, and two ZFS datasets side by side, are separate
    storages; an RBD storage is shared without saying so (every node reaches the cluster)."""
    cfg = parse("[storage.a]\ntype = 'rbd'\npool = 'p'\nnamespace = 'one'\n"
                "[storage.b]\ntype = 'rbd'\npool = 'p'\nnamespace = 'two'\n"
                "[storage.c]\ntype = 'zfs'\npool = 'tank/c'\n[storage.d]\ntype = 'zfs'\npool = 'tank/cd'\n")
    assert cfg.storage("a").shared and cfg.storage("b").shared and cfg.storage("a").on_node("anywhere")
    assert not cfg.storage("c").shared and cfg.storage("d").options["pool"] == "tank/cd"


def test_a_bind_mount_of_one_storage_under_another_path_is_the_same_storage(tmp_path):
    """Two paths, one directory (mount --bind): refused as one directory by name would be, and a
    storage inside that other path too (compared by device and inode)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "alias").mkdir()
    (tmp_path / "images" / "sub").mkdir()
    done = subprocess.run(["mount", "--bind", str(tmp_path / "images"), str(tmp_path / "alias")],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        for other in ("alias", "alias/sub"):
            text = f'[storage.a]\ntype = "dir"\npath = "images"\n[storage.b]\ntype = "dir"\npath = "{other}"\n'
            with pytest.raises(ConfigError, match=r"storages 'a' and 'b' overlap"):
                config.parse(text, tmp_path / "stork.toml", {"STORK_NODE": "n"})
    finally:
        subprocess.run(["umount", str(tmp_path / "alias")], check=False)


@pytest.mark.parametrize(("first", "second", "overlap"), [
    ("[global]\nfsid = 8d8e2c1a-0000-4000-8000-000000000001\n",
     "[global]\nfsid = 8D8E2C1A-0000-4000-8000-000000000001\nmon host = 10.0.0.9\n",
     "fsid 8d8e2c1a-0000-4000-8000-000000000001"),
    ("[global]\nmon_host = 10.0.0.1, 10.0.0.2\n", "# a copy\n[global]\nmon-host = 10.0.0.2 10.0.0.1  ; reordered\n",
     "monitors 10.0.0.1,10.0.0.2"),
    ("[global]\nfsid = a\n", "[global]\nfsid = b\n", None),  # two clusters: two places, whatever their pools
    ("[global]\nmon_host = 10.0.0.1\n", "[client]\nmon_host = 10.0.0.1\n", None),  # not [global]: not told
])
def test_two_rbd_storages_on_one_pool_of_one_cluster_through_two_conf_files_are_refused(tmp_path, first, second,
                                                                                        overlap):
    """A pool is one place whichever ceph.conf reaches it: two storages on one pool and
    namespace through two files naming one cluster (its fsid, else its monitors) are refused,
    as through one file (a volume would have two ids, and pass the other's in-use checks)."""
    (tmp_path / "one.conf").write_text(first)
    (tmp_path / "two.conf").write_text(second)
    text = (f"[storage.a]\ntype = 'rbd'\npool = 'p'\nconf = '{tmp_path / 'one.conf'}'\n"
            f"[storage.b]\ntype = 'rbd'\npool = 'p'\nconf = '{tmp_path / 'two.conf'}'\n")
    if overlap is None:
        assert parse(text).storage("b").options["pool"] == "p"
    else:
        with pytest.raises(ConfigError, match=rf"storages 'a' and 'b' overlap: rbd:{overlap}:p: and rbd:{overlap}:p:"):
            parse(text)


def test_a_ceph_conf_that_is_a_fifo_is_not_read_and_hangs_nothing(tmp_path):
    """The config reads each rbd storage's ceph.conf for its cluster: a FIFO there (nobody
    writing) is passed over, told by its path, as an unreadable file is."""
    fifo = tmp_path / "ceph.conf"
    os.mkfifo(fifo)
    cfg = parse(f"[storage.a]\ntype = 'rbd'\npool = 'p'\nconf = '{fifo}'\n")
    assert cfg.storage("a").options["conf"] == fifo
