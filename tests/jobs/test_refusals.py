"""Every refusal: a one-line error naming the object, exit status 1, and nothing changed —
no file on any storage, no guest config, no half-made job left behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import BASE
from tests.helpers import snapshot


@pytest.fixture(scope="module")
def world(client):
    """G: a guest; T: a template with a linked clone C; L: a guest locked by another job."""
    from drivers.guests import GuestStore

    ids = {"G": 90001, "T": 90002, "C": 90003, "L": 90004, "TL": 90005}
    for name in ("G", "T", "L", "TL"):
        job = client.run("create", vmid=ids[name], disks={"scsi0": {"storage": "local", "size": "16M"}})
        assert job.state == "succeeded", job.error
    assert client.run("template", vmid=ids["T"]).state == "succeeded"
    assert client.run("linked_clone", vmid=ids["T"], newid=ids["C"]).state == "succeeded"
    assert client.run("template", vmid=ids["TL"]).state == "succeeded"
    store = GuestStore(BASE / "guests")
    with store.editing(ids["L"]) as box:
        box[0] = box[0].with_(lock="backup", lock_job="someone-else")
    with store.editing(ids["TL"]) as box:
        box[0] = box[0].with_(lock="destroy", lock_job="someone-else")
    backed = BASE / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(backed)],
                   check=True)
    external = BASE / "external.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={BASE / 'external.data'}",
                    str(external), "1M"], check=True)
    not_an_image = BASE / "notes.txt"
    not_an_image.write_text("these are not the sectors you are looking for\n")
    shared = BASE / "world-writable.raw"  # another user could rewrite it once it is checked
    shared.write_bytes(bytes(1 << 20))
    shared.chmod(0o646)
    users = BASE / "users"  # root's descriptor, naming an extent another user could rewrite
    users.mkdir(exist_ok=True)
    (users / "disk-flat.vmdk").write_bytes(bytes(1 << 20))
    os.chown(users / "disk-flat.vmdk", 65534, 65534)
    (users / "disk.vmdk").write_text('version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                                     'RW 2048 FLAT "disk-flat.vmdk" 0\n')
    theirs = BASE / "theirs"  # a user's descriptor naming root's file: its descriptor would reach their qemu
    theirs.mkdir(exist_ok=True)
    (theirs / "disk-flat.vmdk").write_bytes(bytes(1 << 20))
    (theirs / "disk-flat.vmdk").chmod(0o600)
    (theirs / "disk.vmdk").write_text((users / "disk.vmdk").read_text())
    os.chown(theirs / "disk.vmdk", 65534, 65534)
    return {**ids, "base": f"local:base/base-{ids['T']}-disk-0.raw",
            "gdisk": f"local:{ids['G']}/vm-{ids['G']}-disk-0.raw", "text": str(not_an_image),
            "backed": str(backed), "external": str(external), "shared": str(shared),
            "users_extent": str(users / "disk.vmdk"), "roots_extent": str(theirs / "disk.vmdk"),
            **hostile_images(BASE / "hostile")}


def hostile_images(folder) -> dict[str, str]:
    """Images that name other files, or that stork does not import, made by qemu-img (and one
    VMDK descriptor by hand). qemu's own probe of the descriptor would open the FIFO it names
    as an extent and hang: stork tells the format itself, so it is refused at once."""
    import os

    folder.mkdir(exist_ok=True)
    fifo = folder / "extent.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    descriptor = folder / "flat.vmdk"
    descriptor.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                          f'createType="monolithicFlat"\n\nRW 2048 FLAT "{fifo}" 0\nRW 2048 FLAT "/etc/hostname" 0\n')
    linked = folder / "linked.vmdk"
    linked.write_text('version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                      'RW 2048 FLAT "linked-flat.vmdk" 0\n')
    if not (folder / "linked-flat.vmdk").is_symlink():
        (folder / "linked-flat.vmdk").symlink_to("/etc/hostname")
    import struct

    zero_capacity = folder / "zero-capacity.vmdk"  # qemu reads its embedded descriptor as a file's: any extent
    header = bytearray(b"KDMV" + b"\x00" * 508)
    header[28:44] = struct.pack("<QQ", 1, 1)
    zero_capacity.write_bytes(bytes(header) + b'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "/etc/hostname" 0\n')
    made = {"descriptor": descriptor, "qcow1": folder / "backed.qcow", "delta": folder / "delta.vmdk",
            "zero_capacity": zero_capacity,
            "qed": folder / "disk.qed", "linked_extent": linked, "hostile_dir": folder}
    for argv in (["-f", "vmdk", str(folder / "parent.vmdk"), "1M"],
                 ["-f", "qcow", "-b", "/etc/hostname", "-F", "raw", str(made["qcow1"])],
                 ["-f", "vmdk", "-b", str(folder / "parent.vmdk"), "-F", "vmdk", str(made["delta"])],
                 ["-f", "qed", str(made["qed"]), "1M"]):
        subprocess.run(["qemu-img", "create", "-q", *argv], check=True)
    return {**{name: str(path) for name, path in made.items()}, **hostile_ovas(folder)}


def hostile_ovas(folder) -> dict[str, str]:
    """OVAs that must not be imported: an OVF reading /etc/passwd through an entity, a disk
    member that is a symlink, a capacity the image does not have, a disk the archive lacks."""
    import io
    import tarfile

    from worker.testing import make_ova, ovf_text

    disk = folder / "parent.vmdk"  # 1 MiB
    one = [("disk.vmdk", 1 << 20, "6", "0")]
    xxe = ovf_text(one, prolog='<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>', name="&x;")
    made = {"ova_xxe": make_ova(folder / "xxe.ova", [("a.ovf", xxe.encode()), ("disk.vmdk", disk)]),
            "ova_size": make_ova(folder / "size.ova", [("a.ovf", ovf_text([("disk.vmdk", 2 << 20, "6", "0")]).encode()),
                                                       ("disk.vmdk", disk)]),
            "ova_lacking": make_ova(folder / "lacking.ova", [("a.ovf", ovf_text(one).encode())])}
    with tarfile.open(folder / "symlink.ova", "w") as tar:
        text = ovf_text(one).encode()
        info = tarfile.TarInfo("a.ovf")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
        link = tarfile.TarInfo("disk.vmdk")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    made["ova_symlink"] = folder / "symlink.ova"
    (folder / "escape.ovf").write_text(ovf_text([("../parent.vmdk", 1 << 20, "6", "0")]))
    made["ovf_escape"] = folder / "escape.ovf"
    linked = folder / "linked"
    linked.mkdir(exist_ok=True)
    (linked / "linked.ovf").write_text(ovf_text([("disk.vmdk", 1 << 20, "6", "0")]))
    if not (linked / "disk.vmdk").is_symlink():
        (linked / "disk.vmdk").symlink_to(disk)
    made["ovf_linked"] = linked / "linked.ovf"
    return {name: str(path) for name, path in made.items()}


REFUSALS = [
    # (what, args with {placeholders}, expected one-line message)
    ("unknown storage", "guest create 91001 --disk scsi0=nope:1G", "unknown storage 'nope' (configured: "),
    ("unknown guest", "template 91002", "unknown guest 91002"),
    ("unknown guest to clone", "clone 91003 91004 --full", "unknown guest 91003"),
    ("unknown volume", "volume info local:91005/vm-91005-disk-0.raw", "unknown volume local:91005/vm-91005-disk-0.raw"),
    ("unknown volume to convert", "base local:91006/vm-91006-disk-0.raw",
     "unknown volume local:91006/vm-91006-disk-0.raw"),
    ("unknown volume to free", "volume free local:91007/vm-91007-disk-0.raw",
     "unknown volume local:91007/vm-91007-disk-0.raw"),
    ("path traversal", "base local:base/../../etc/passwd", "invalid volume name 'base/../../etc/passwd'"),
    ("leading dash", "volume info local:base/-rf.raw", "invalid volume name 'base/-rf.raw'"),
    ("slash in a base name", "base {gdisk} --name a/b", "invalid base name 'a/b'"),
    ("dot-dot base name", "base {gdisk} --name ..", "invalid base name '..'"),
    ("empty volume name", "volume info local:", "invalid volume id 'local:': the volume name is empty"),
    ("no storage part", "volume free vm-100-disk-0.raw", "invalid volume id 'vm-100-disk-0.raw'"),
    ("non-ASCII name", "base {gdisk} --name bäse", "invalid base name 'bäse'"),
    ("over-long name", "base {gdisk} --name " + "x" * 130, "invalid base name 'xxxx"),
    ("existing target guest", "clone {T} {G}", "guest {G} already exists"),
    ("existing guest on create", "guest create {G} --disk scsi0=local:1G", "guest {G} already exists"),
    ("linked clone of a non-template", "clone {G} 91008 --linked",
     "guest {G} is not a template: a linked clone needs one (use --full)"),
    ("linked clone to another storage", "clone {T} 91009 --storage shared",
     "a linked clone must be on the storage of its base: {base} is on 'local', not 'shared' (use --full, or a "
     "storage of another node: a replica is made there)"),
    ("linked clone as raw", "clone {T} 91010 --format raw", "a linked clone on 'local' is qcow2, not raw (use --full)"),
    ("converting a locked guest", "template {L}", "guest {L} is locked (backup)"),
    ("converting a template again", "template {T}",
     "guest {T} is a template: making it a template again is not allowed"),
    ("writing a template's disk", "disk resize {base} 1G",
     "{base}: resizing (writing) is not allowed: it is a read-only base image"),
    ("moving a base that linked clones read through", "disk move {T} scsi0 shared",
     "{base} is a base with 1 linked clone(s), which read through it where it is: local:{C}/vm-{C}-disk-0.qcow2"),
    ("a base again", "base {base}", "{base}: converting to a base image is not allowed: it is a read-only base image"),
    ("freeing a template's base", "volume free {base}", "{base} is in use by guest {T} (scsi0)"),
    ("destroying a template with clones", "guest destroy {T}",
     "guest {T}: base {base} still has linked clones: local:{C}/vm-{C}-disk-0.qcow2"),
    ("shrinking", "disk resize {gdisk} 1M", "{gdisk}: shrinking is not supported (would lose data)"),
    ("not a disk image", "guest import 91014 --disk scsi0={text}", "{text}: not a disk image"),
    ("image reading another file", "guest import 91019 --disk scsi0={backed}",
     "{backed}: images with a backing or data file cannot be imported"),
    ("image with an external data file", "guest import 91023 --disk scsi0={external}",
     "{external}: images with a backing or data file cannot be imported"),
    ("image others than its owner may write", "guest import 91037 --disk scsi0={shared}",
     "{shared}: others than its owner may write it (mode 0646); import a copy only its owner can write"),
    ("VMDK extent of another user than its descriptor's", "guest import 91038 --disk scsi0={users_extent}",
     "{users_extent}: extent disk-flat.vmdk: belongs to uid 65534, not to root"),
    ("a user's VMDK naming an extent of root's", "guest import 91039 --disk scsi0={roots_extent}",
     "{roots_extent}: extent disk-flat.vmdk: belongs to uid 0, not to uid 65534, whose descriptor names it"),
    ("zero-padded guest id in a volume", "volume free local:0{G}/vm-{G}-disk-0.raw",
     "invalid volume name '0{G}/vm-{G}-disk-0.raw'"),
    ("linked clone of a locked template", "clone {TL} 91021", "guest {TL} is locked (destroy)"),
    ("bad guest name", "clone {T} 91022 --name a/b", "invalid guest name 'a/b'"),
    ("missing image file", "guest import 91015 --disk scsi0=/nonexistent.raw", "/nonexistent.raw: no such file"),
    ("VMDK descriptor naming a FIFO and /etc/hostname", "guest import 91024 --disk scsi0={descriptor}",
     "{descriptor}: VMDK extent '{hostile_dir}/extent.fifo' is not a file beside the descriptor"),
    ("VMDK descriptor whose extent beside it is a symlink", "guest import 91035 --disk scsi0={linked_extent}",
     "linked-flat.vmdk: is a symbolic link"),
    ("qcow (v1) reading another file", "guest import 91025 --disk scsi0={qcow1}",
     "{qcow1}: images with a backing or data file cannot be imported"),
    ("delta VMDK reading its parent", "guest import 91026 --disk scsi0={delta}",
     "{delta}: vmdk image refused: a delta VMDK reads its parent disk"),
    ("sparse VMDK of capacity 0 naming /etc/hostname", "guest import 91036 --disk scsi0={zero_capacity}",
     "{zero_capacity}: vmdk image refused: a sparse VMDK of capacity 0 is read by its embedded descriptor"),
    ("format stork does not import", "guest import 91027 --disk scsi0={qed}",
     "{qed}: qed image refused: qed images are not imported"),
    ("OVF reading a file through an entity", "guest import 91029 --ova {ova_xxe}",
     "{ova_xxe}:a.ovf: OVF refused: DTDForbidden"),
    ("OVA disk that is a symlink", "guest import 91030 --ova {ova_symlink}",
     "{ova_symlink}: member 'disk.vmdk' is not a regular file"),
    ("OVF capacity the image does not have", "guest import 91031 --ova {ova_size}",
     "{ova_size}:disk.vmdk: the OVF says the disk holds 2097152 bytes, the image 1048576"),
    ("OVA lacking the disk its OVF names", "guest import 91032 --ova {ova_lacking}",
     "{ova_lacking}: the archive has no member 'disk.vmdk'"),
    ("OVF naming a disk outside its folder", "guest import 91033 --ovf {ovf_escape}",
     "{ovf_escape}: disk file '../parent.vmdk' is not a plain file name"),
    ("OVF whose disk file is a symlink", "guest import 91034 --ovf {ovf_linked}",
     "disk.vmdk: is a symbolic link"),
    ("storage of another node", "guest create 91016 --disk scsi0=local2:1G",
     "storage 'local2' is local to node(s) node2: it does not exist on node 'node1'"),
    ("storage without images", "guest create 91017 --disk scsi0=backup:1G",
     "storage 'backup' does not hold disk images (content: images)"),
    ("unknown disk of a guest", "disk move {G} scsi5 shared", "guest {G} has no disk scsi5 (disks: scsi0)"),
    ("unknown job", "job show 0123456789ab", "unknown job '0123456789ab'"),
]


@pytest.mark.parametrize(("what", "args", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(stork, world, client, what, args, message):
    """The command exits 1 with one line naming what is wrong, before a job exists (each of
    these needs no other node to tell); nothing on disk changes."""
    before, jobs = snapshot(), [j.id for j in client.jobs(10)]
    code, out, err = stork(*args.format(**world).split(" "))
    after = snapshot()
    text = (err + out).strip()
    assert code == 1, text
    assert message.format(**world) in text
    assert len(err.strip().splitlines()) == 1 and err.startswith("stork: ")
    assert before == after
    assert [j.id for j in client.jobs(10)] == jobs, "refused by a job, not at submit"


def test_a_refusal_at_submit_creates_no_job(stork, world, client):
    """Options refused when submitted never reach the queue: no job record appears."""
    before = [j.id for j in client.jobs(10)]
    assert stork("clone", str(world["G"]), "91020", "--linked")[0] == 1
    assert stork("guest", "destroy", str(world["T"]))[0] == 1  # its base has linked clones: no failed job
    assert [j.id for j in client.jobs(10)] == before


def test_the_locked_guest_keeps_its_lock(client, world):
    """A refused conversion leaves another job's lock in place."""
    assert client.guest(world["L"]).lock == "backup"


def test_freeing_a_base_with_linked_clones_lists_them(stork, client, vmid):
    """A base no guest uses any more (its template's config is gone) still cannot be freed
    while clones read through it; the error names every clone."""
    t, c1, c2 = vmid(), vmid(), vmid()
    assert client.run("create", vmid=t, disks={"scsi0": {"storage": "local", "size": "8M"}}).state == "succeeded"
    assert client.run("template", vmid=t).state == "succeeded"
    for c in (c1, c2):
        assert client.run("linked_clone", vmid=t, newid=c).state == "succeeded"
    (BASE / "guests" / f"{t}.toml").unlink()  # an operator removed the template's config by hand
    base = f"local:base/base-{t}-disk-0.raw"
    before = snapshot()
    code, out, err = stork("volume", "free", base)
    assert code == 1 and out == ""  # a failure is said once, on stderr
    assert (f"{base} is a base image with 2 linked clone(s): local:{c1}/vm-{c1}-disk-0.qcow2, "
            f"local:{c2}/vm-{c2}-disk-0.qcow2") in err
    assert snapshot() == before


def test_a_base_a_copied_clone_reads_through_is_kept(stork, client, vmid):
    """A copy of a linked clone that an operator kept beside it (`cp -p disk.qcow2 disk.qcow2.bak`,
    before trying something) reads through the base as the clone does, by its relative path, but
    no volume id names it: the template's destroy, and a free of the base once the template is
    gone, are refused naming the file, and the copy still reads its data."""
    t, c = vmid(), vmid()
    assert client.run("create", vmid=t, disks={"scsi0": {"storage": "local", "size": "8M"}}).state == "succeeded"
    assert client.run("template", vmid=t).state == "succeeded"
    assert client.run("linked_clone", vmid=t, newid=c).state == "succeeded"
    kept = BASE / "images" / str(c) / f"vm-{c}-disk-0.qcow2.bak"
    subprocess.run(["cp", "-p", str(kept.with_suffix("")), str(kept)], check=True)
    assert client.run("destroy", vmid=c).state == "succeeded"
    base = f"local:base/base-{t}-disk-0.raw"
    before = snapshot()
    code, _, err = stork("guest", "destroy", str(t))
    assert (code, err) == (1, f"stork: guest {t}: base {base} still has linked clones: file {kept}\n")
    (BASE / "guests" / f"{t}.toml").unlink()  # an operator removed the template's config by hand
    del before["guests"][f"{t}.toml"]
    code, _, err = stork("volume", "free", base)
    assert code == 1 and err.endswith(f"{base} is a base image with 1 linked clone(s): file {kept}\n")  # in its step
    assert snapshot() == before
    subprocess.run(["qemu-img", "check", "-q", str(kept)], check=True)  # its backing file is there still


def test_unknown_options_are_refused_at_submit_naming_the_allowed_ones(client):
    """The Python client gets the same one-line refusal for an option no job kind knows."""
    from drivers.errors import StorkError

    with pytest.raises(StorkError, match=r"create: unknown option\(s\) colour \(allowed: disks, name, node, vmid\)"):
        client.submit("create", vmid=91030, colour="blue", disks={})
    with pytest.raises(StorkError, match=r"unknown job kind 'teleport' \(known: create, import, "):
        client.submit("teleport", vmid=91031)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["guest", "create", "91040"], "stork: at least one --disk is needed"),
        (["guest", "create", "91041", "--disk", "scsi0"], "stork: invalid --disk 'scsi0'"),
        (["guest", "create", "91042", "--disk", "scsi0=local"], "stork: invalid --disk 'scsi0=local'"),
        (["guest", "create", "91043", "--disk", "scsi0=local:1G,qcow2"], "stork: invalid option 'qcow2'"),
        (["guest", "create", "91044", "--disk", "scsi99=local:8"], "stork: invalid disk 'scsi99'"),
        (["guest", "create", "91018", "--disk", "bogus=local:1G"], "stork: invalid disk 'bogus'"),
        (["guest", "create", "91011", "--disk", "scsi0=local:0"], "stork: invalid size '0': must be greater than zero"),
        (["guest", "create", "91012", "--disk", "scsi0=local:-1G"], "stork: invalid size '-1G'"),
        (["guest", "create", "91013", "--disk", "scsi0=local:lots"], "stork: invalid size 'lots'"),
        (["guest", "create", "91045", "--disk", "scsi0=local:8GB"], "stork: invalid size '8GB': GB is ambiguous"),
        (["guest", "create", "91046", "--disk", "scsi0=local:4K"], "stork: invalid size '4K': below 1 MiB"),
        (["guest", "create", "9x", "--disk", "scsi0=local:8"], "stork: invalid guest id"),
        (["guest", "create", "91047", "--disk", "scsi0=local:8", "--disk", "scsi0=local:8"],
         "stork: disk scsi0 is given twice"),
        # a value given twice was taken without a word (the head's, or the last)
        (["guest", "create", "91049", "--disk", "scsi0=local:8G,size=1T"],
         "stork: invalid --disk 'scsi0=local:8G,size=1T': size is given by DISK=STORAGE:SIZE already"),
        (["guest", "create", "91049", "--disk", "scsi0=local:8G,storage=nope"],
         "stork: invalid --disk 'scsi0=local:8G,storage=nope': storage is given by DISK=STORAGE:SIZE already"),
        (["guest", "create", "91049", "--disk", "scsi0=local:8G,format=qcow2,format=raw"],
         "stork: invalid option 'format=qcow2,format=raw': format is given twice"),
        (["backup", "91049", "91049"], "stork: guest 91049 is named twice"),
        # exit 2 as at create (they exited 1), and a +SIZE without its guest says where it goes
        (["disk", "resize", "local:91050/vm-91050-disk-0.raw", "8X"], "stork: invalid size '8X'"),
        (["disk", "resize", "local:91050/vm-91050-disk-0.raw", "+4G"],
         "stork: invalid size '+4G': +SIZE (grow by SIZE) goes with VMID DISK, not with a volume id"),
        (["guest", "import", "91051", "--disk", "scsi0=,storage=local"],  # the working directory, before
         "stork: invalid --disk 'scsi0=,storage=local': expected DISK=PATH"),
        (["guest", "import", "91048"], "stork: guest import: give --disk DISK=PATH (one or more), --ova FILE or --ovf"),
        (["guest", "import", "91048", "--disk", "scsi0=/a.raw", "--ova", "/a.ova"],
         "stork: guest import: give --disk DISK=PATH (one or more), --ova FILE or --ovf FILE: one of them"),
        (["guest", "import", "91048", "--ovf", "/a.ovf", "--ova", "/a.ova"],
         "stork: guest import: give --disk DISK=PATH (one or more), --ova FILE or --ovf FILE: one of them"),
        (["guest", "import", "91048", "--disk", "scsi0=/a.raw", "--storage", "local"],
         "stork: guest import: --storage and --format go with --ova"),
    ],
)
def test_command_line_mistakes_exit_2(stork, args, message):
    """Mistakes in the command line itself exit 2, like argparse's own, with one line."""
    before = snapshot()
    code, _, err = stork(*args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1
    assert snapshot() == before


def test_a_bad_node_name_is_refused_at_submit(client):
    """The node option is checked like every name that reaches a queue or a config."""
    from drivers.errors import InvalidName

    with pytest.raises(InvalidName, match=r"invalid node name 'Bad Node/\.\.'"):
        client.submit("ping", node="Bad Node/..")
    with pytest.raises(InvalidName, match=r"invalid delete_source 'yes': expected true or false"):
        client.submit("move", vmid=90001, disk="scsi0", storage="shared", delete_source="yes")


def test_a_job_id_naming_another_key_is_unknown(stork):
    """`job show <id>:events` names the job's event stream, not a job: one line, exit 1."""
    code, out, err = stork("job", "show", "0123456789ab:events")
    assert (code, out, err) == (1, "", "stork: unknown job '0123456789ab:events'\n")


def test_job_cancel_with_json_prints_only_json(client, vmid):
    """`stork --json job cancel` prints the JSON answer and nothing else on stdout."""
    import json
    import subprocess
    import sys

    from worker.testing import ROOT

    job = client.submit("ping", node="nowhere")  # waits on a queue no worker serves
    done = subprocess.run([sys.executable, "-m", "producer.cli", "--json", "job", "cancel", job.id], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"job": job.id, "cancel": "requested"}


def test_a_disk_given_twice_is_a_command_line_mistake(stork):
    """`--disk scsi0=... --disk scsi0=...` is refused (exit 2) instead of keeping the last."""
    code, out, err = stork("guest", "create", "97001", "--disk", "scsi0=local:1M", "--disk", "scsi0=local:2M")
    assert (code, out, err) == (2, "", "stork: disk scsi0 is given twice\n")


def test_a_closed_pipe_ends_the_listing_quietly(workers):
    """`stork job list | head`: once the reader has gone, exit 0 and nothing on stderr."""
    import subprocess
    import sys

    from worker.testing import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "job", "list"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_a_base_of_a_disk_attached_twice_is_refused_at_submit(stork, client, vmid):
    """A guest that runs from a disk keeps a linked clone of its new base: one clone for two
    slots would diverge from the one volume they shared, so that is refused, before any job."""
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    disk = client.guest(g).disks["scsi0"]
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(disks={"scsi0": disk, "scsi1": disk})
    jobs = [j.id for j in client.jobs(10)]
    code, _, err = stork("base", disk)
    assert code == 1 and err == f"stork: guest {g} attaches {disk} twice (scsi0, scsi1): detach one first\n"
    assert [j.id for j in client.jobs(10)] == jobs
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(disks={"scsi0": disk})


def test_an_import_as_template_takes_only_true_or_false(client):
    from drivers.errors import InvalidName

    with pytest.raises(InvalidName, match="import: as_template must be true or false, not 'yes'"):
        client.submit("import", vmid=91028, disks={"scsi0": {"path": "/nonexistent.raw"}}, as_template="yes")
