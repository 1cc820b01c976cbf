"""Plugin snapshots and contained writes, on real files in tmp_path, crashes included."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from statemachine.snapshots import Entry, Manifest, SnapshotError, restore, take
from statemachine.workspace import open_log
from statemachine.writes import (
    WriteError, apply, cleanup_temp, move_dir, plan_targets, settled, write_atomic,
)

PROJECT = Path(__file__).resolve().parent.parent
HEX = "0123456789abcdef"


def listing(top: Path) -> dict[str, tuple]:
    """Everything below `top` as a user would see it: kind, permission bits, bytes or target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(top).as_posix()
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, path.read_bytes())
            else:
                out[rel] = ("special",)
    return out


def write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


@pytest.fixture
def market(tmp_path: Path) -> Path:
    root = tmp_path / "market"
    plugin = root / "plugins" / "p"
    write(plugin / ".claude-plugin" / "plugin.json", '{"name": "p"}')
    write(plugin / "README.md", "# p\n")
    write(plugin / "scripts" / "run.sh", "#!/bin/sh\necho hi\n", 0o755)
    write(plugin / "skills" / "a" / "SKILL.md", "---\nname: a\n---\n")
    write(plugin / "skills" / "a" / "references" / "deep" / "x.bin", bytes(range(256)) * 9, 0o600)
    (plugin / "empty" / "nested-empty").mkdir(parents=True)
    os.symlink("../../README.md", plugin / "skills" / "a" / "readme-link")
    return root


@pytest.fixture
def store(tmp_path: Path):
    with open_log(tmp_path, tmp_path / "log.db") as s:
        yield s


def snapshot_into(store, root: Path, plugin: Path) -> str:
    snap = take(root, plugin)
    with store.batch():
        for blob in snap.blobs:
            store.put_blob(blob)
    return snap.tree_sha256


def put_manifest(store, entries: list[Entry]) -> str:
    return store.put_blob(msgspec.json.encode(Manifest(format=1, mode=0o755, entries=entries)))


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if re.search(r"\.overnight-(tmp|restore|old)-", p.name)]


# ------------------------------------------------------------------ snapshots


def test_snapshot_round_trip_restores_exact_tree(market: Path, store) -> None:
    plugin = market / "plugins" / "p"
    os.chmod(plugin / "scripts" / "run.sh", 0o4755)
    write(plugin / ".git" / "HEAD", "ref: refs/heads/main\n")
    tree = snapshot_into(store, market, plugin)
    before = listing(plugin)

    (plugin / "README.md").write_text("changed")
    (plugin / "skills" / "a" / "SKILL.md").unlink()
    (plugin / "empty" / "nested-empty").rmdir()
    (plugin / "skills" / "a" / "readme-link").unlink()
    os.symlink("SKILL.md", plugin / "skills" / "a" / "readme-link")
    write(plugin / "new" / "file.txt", "added")
    os.chmod(plugin / "scripts" / "run.sh", 0o644)

    restore(store.get_blob, market, plugin, tree)

    after = listing(plugin)
    assert after["scripts/run.sh"][1] == 0o755  # executable kept, setuid stripped
    before["scripts/run.sh"] = ("file", 0o755, before["scripts/run.sh"][2])
    assert after == before
    assert (plugin / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert take(market, plugin).tree_sha256 == tree
    assert leftovers(market) == []


def test_snapshot_leaves_out_skipped_dirs_and_is_canonical(market: Path) -> None:
    plugin = market / "plugins" / "p"
    first = take(market, plugin)
    write(plugin / "node_modules" / "dep" / "index.js", "x")
    write(plugin / ".overnight" / "state", "x")
    second = take(market, plugin)
    assert second.manifest == first.manifest
    assert second.blobs[-1] == second.manifest
    assert hashlib.sha256(second.manifest).hexdigest() == second.tree_sha256
    paths = [e["path"] for e in json.loads(first.manifest)["entries"]]
    assert "empty/nested-empty" in paths and paths == sorted(paths, key=lambda p: p.split("/"))


def test_restore_into_missing_dir(market: Path, store) -> None:
    plugin = market / "plugins" / "p"
    tree = snapshot_into(store, market, plugin)
    before = listing(plugin)
    target = market / "plugins" / "restored" / "p2"
    restore(store.get_blob, market, target, tree)
    assert listing(target) == before


def test_restore_refuses_corrupt_blob_and_changes_nothing(market: Path, store) -> None:
    plugin = market / "plugins" / "p"
    tree = snapshot_into(store, market, plugin)
    digest = hashlib.sha256((plugin / "README.md").read_bytes()).hexdigest()
    store.conn.execute("UPDATE blobs SET data = ? WHERE hash = ?", (b"tampered", digest))
    (plugin / "README.md").write_text("edited since")
    before = listing(market)
    with pytest.raises(SnapshotError, match="corrupt"):
        restore(store.get_blob, market, plugin, tree)
    assert listing(market) == before


def test_restore_refuses_missing_manifest(market: Path, store) -> None:
    before = listing(market)
    with pytest.raises(SnapshotError, match="not in the store"):
        restore(store.get_blob, market, market / "plugins" / "p", "0" * 64)
    assert listing(market) == before


@pytest.mark.parametrize("bad", ["../evil", "/etc/evil", "a\x00b", "a//b", "./a", "a/.."])
def test_restore_refuses_bad_entry_paths(market: Path, store, bad: str) -> None:
    data = b"evil"
    entries = [Entry(path=bad, kind="file", mode=0o644, size=4,
                     sha256=store.put_blob(data))]
    tree = put_manifest(store, entries)
    before = listing(market)
    with pytest.raises(SnapshotError, match="snapshot entry '.*' .*; refusing to restore"):
        restore(store.get_blob, market, market / "plugins" / "p", tree)
    assert listing(market) == before


@pytest.mark.parametrize("entries", [
    [Entry(path="l", kind="symlink", mode=0o777, size=1, target="../../../outside")],
    [Entry(path="l", kind="symlink", mode=0o777, size=1, target="/etc/passwd")],
    # Lexically inside, but `up` resolves to the root, so `up/../x` is above it.
    [Entry(path="up", kind="symlink", mode=0o777, size=5, target="../.."),
     Entry(path="l", kind="symlink", mode=0o777, size=7, target="up/../x")],
], ids=["relative", "absolute", "through-another-link"])
def test_restore_puts_symlinks_back_as_they_were_wherever_they_point(market: Path, store, entries) -> None:
    """A plugin that held a link leaving the marketplace gets it back (restore-plugin must undo
    overnight's change exactly); creating a link writes nothing through it."""
    tree = put_manifest(store, entries)
    plugin = market / "plugins" / "p"
    before = {k: v for k, v in listing(market).items() if not k.startswith("plugins/p")}
    restore(store.get_blob, market, plugin, tree)
    assert {e.path: os.readlink(plugin / e.path) for e in entries} == {e.path: e.target for e in entries}
    assert sorted(p.name for p in plugin.iterdir()) == sorted(e.path for e in entries)
    assert {k: v for k, v in listing(market).items() if not k.startswith("plugins/p")} == before


def test_restore_never_writes_through_a_symlink_it_restored(market: Path, store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = put_manifest(store, [Entry(path="a", kind="symlink", mode=0o777, size=1, target=str(outside)),
                                Entry(path="a/x", kind="file", mode=0o644, size=1, sha256=store.put_blob(b"x"))])
    with pytest.raises(SnapshotError, match="has no directory entry for its parent"):
        restore(store.get_blob, market, market / "plugins" / "p", tree)
    assert list(outside.iterdir()) == []


def test_a_root_restore_checks_every_blob_before_it_changes_anything(market: Path, store) -> None:
    write(market / "README.md", "# the marketplace, a plugin itself\n")
    write(market / ".claude-plugin" / "plugin.json", '{"name": "root"}')
    tree = snapshot_into(store, market, market)
    digest = hashlib.sha256(b"# the marketplace, a plugin itself\n").hexdigest()
    store.conn.execute("UPDATE blobs SET data = ? WHERE hash = ?", (b"tampered", digest))
    write(market / "NOTES.md", "added since")
    before = listing(market)
    with pytest.raises(SnapshotError, match="corrupt"):
        restore(store.get_blob, market, market, tree)
    assert listing(market) == before


def test_a_root_restore_never_removes_another_plugin_to_put_a_file_in_its_place(market: Path, store) -> None:
    """The root plugin had a file `tools`; a plugin now lives in a directory of that name. A
    swap would carry the plugin into the old tree and remove it with that; in place, the
    restore refuses, naming the directory, and the plugin stays."""
    write(market / ".claude-plugin" / "plugin.json", '{"name": "root"}')
    write(market / "tools", "a file once\n")
    tree = snapshot_into(store, market, market)
    (market / "tools").unlink()
    write(market / "tools" / "inner" / ".claude-plugin" / "plugin.json", '{"name": "inner"}')
    others = listing(market / "plugins")
    with pytest.raises(SnapshotError, match="cannot restore tools: the snapshot has a file there, and the directory"):
        restore(store.get_blob, market, market, tree)
    assert (market / "tools" / "inner" / ".claude-plugin" / "plugin.json").is_file()
    assert listing(market / "plugins") == others


def test_take_never_follows_symlinks_and_survives_loops_and_fifos(market: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "outside" / "secret.txt", "TOP SECRET")
    plugin = market / "plugins" / "p"
    os.symlink(secret, plugin / "leak")
    os.symlink(tmp_path / "outside", plugin / "leak-dir")
    os.symlink("loop", plugin / "loop")
    os.symlink("../p", plugin / "self")
    os.mkfifo(plugin / "pipe")
    snap = take(market, plugin)
    assert all(b"TOP SECRET" not in blob for blob in snap.blobs)
    entries = {e["path"]: e for e in json.loads(snap.manifest)["entries"]}
    assert entries["leak"] == {"path": "leak", "kind": "symlink", "mode": entries["leak"]["mode"],
                               "size": len(str(secret)), "target": str(secret)}
    assert entries["loop"]["target"] == "loop"
    assert "pipe" not in entries and not any(p.startswith(("leak-dir/", "self/")) for p in entries)


def test_take_refuses_a_plugin_outside_root(market: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", market / "plugins" / "out")
    with pytest.raises(SnapshotError, match="not a directory inside"):
        take(market, market / "plugins" / "out")


# ------------------------------------------------------------------ writes


def test_write_atomic_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    plugin = tmp_path / "p"
    plugin.mkdir()
    write_atomic(plugin, "skills/s/references/x.md", b"hello", None)
    write_atomic(plugin, "skills/s/references/x.md", b"hello again", sha(b"hello"))
    target = plugin / "skills" / "s" / "references" / "x.md"
    assert target.read_bytes() == b"hello again"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(tmp_path) == []


def test_write_atomic_replaces_a_symlink_target_instead_of_following_it(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside.txt", "keep me")
    plugin = tmp_path / "p"
    (plugin / "skills" / "s").mkdir(parents=True)
    os.symlink(outside, plugin / "skills" / "s" / "SKILL.md")
    write_atomic(plugin, "skills/s/SKILL.md", b"new", f"symlink {outside}")
    assert outside.read_text() == "keep me"
    assert not (plugin / "skills" / "s" / "SKILL.md").is_symlink()
    assert (plugin / "skills" / "s" / "SKILL.md").read_bytes() == b"new"


def test_write_atomic_refuses_a_symlinked_parent(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    plugin = tmp_path / "p"
    plugin.mkdir()
    os.symlink(outside, plugin / "skills")
    with pytest.raises(WriteError, match="skills is a symlink"):
        write_atomic(plugin, "skills/s/SKILL.md", b"x", None)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("rel, message", [
    ("skills/other/SKILL.md", "not inside"),
    ("skills/s/../x.md", "'..'"),
    ("/abs/SKILL.md", "absolute"),
    ("skills/s\\x.md", "backslash"),
    ("skills/s/link/x.md", "symlink"),
    ("skills/s/file/x.md", "not a directory"),
    ("skills/s/dir", "existing directory"),
])
def test_plan_targets_refuses_bad_paths(tmp_path: Path, rel: str, message: str) -> None:
    plugin = tmp_path / "p"
    write(plugin / "skills" / "s" / "file", "x")
    (plugin / "skills" / "s" / "dir").mkdir()
    os.symlink(tmp_path, plugin / "skills" / "s" / "link")
    plan_targets(plugin, "skills/s", {"skills/s/SKILL.md": b"", "skills/s/references/a.md": b""})
    with pytest.raises(WriteError, match=message):
        plan_targets(plugin, "skills/s", {rel: b"x"})


def test_move_dir_is_idempotent_and_refuses_symlinks(tmp_path: Path) -> None:
    plugin = tmp_path / "p"
    write(plugin / "skills" / "skill-adapter" / "SKILL.md", "old")
    move_dir(plugin, "skills/skill-adapter", "skills/new")
    move_dir(plugin, "skills/skill-adapter", "skills/new")
    assert (plugin / "skills" / "new" / "SKILL.md").read_text() == "old"
    assert not (plugin / "skills" / "skill-adapter").exists()
    os.symlink(tmp_path, plugin / "skills" / "linked")
    with pytest.raises(WriteError, match="symlink"):
        move_dir(plugin, "skills/linked", "skills/other")
    (plugin / "skills" / "again").mkdir()
    with pytest.raises(WriteError, match="already exists"):
        move_dir(plugin, "skills/again", "skills/new")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_apply_is_idempotent_and_settled_tells_when_done(tmp_path: Path) -> None:
    plugin = tmp_path / "p"
    write(plugin / "skills" / "skill-adapter" / "SKILL.md", "old")
    write(plugin / "skills" / "skill-adapter" / "references" / "keep.md", "keep")
    files = {"skills/new/SKILL.md": b"new skill", "skills/new/references/r.md": b"ref"}
    moves = [("skills/skill-adapter", "skills/new")]
    hashes = {rel: sha(data) for rel, data in files.items()}
    before = {"skills/new/SKILL.md": sha(b"old"), "skills/new/references/r.md": None}
    assert not settled(plugin, hashes, moves)
    apply(plugin, files, moves, before)
    once = listing(plugin)
    assert settled(plugin, hashes, moves)
    apply(plugin, files, moves, before)
    assert listing(plugin) == once
    assert once["skills/new/references/keep.md"][2] == b"keep"
    (plugin / "skills" / "new" / "SKILL.md").write_bytes(b"tampered")
    assert not settled(plugin, hashes, moves)
    assert not settled(plugin, hashes, [("skills/new", "skills/elsewhere")])


def test_apply_never_writes_over_a_change_made_since_the_snapshot(tmp_path: Path, monkeypatch) -> None:
    """A target holding neither what the snapshot saw nor its new bytes is someone else's change:
    found before anything is written, or, made while the files are written, right before its rename."""
    plugin = tmp_path / "p"
    write(plugin / "skills" / "s" / "SKILL.md", "edited by a person")
    files = {"skills/s/SKILL.md": b"new skill", "skills/s/references/a.md": b"ref"}
    before = {"skills/s/SKILL.md": sha(b"as snapshotted"), "skills/s/references/a.md": None}
    with pytest.raises(WriteError, match="^skills/s/SKILL.md changed since overnight took the plugin's snapshot"):
        apply(plugin, files, [], before)
    assert sorted(listing(plugin)) == ["skills", "skills/s", "skills/s/SKILL.md"]  # nothing written
    assert (plugin / "skills/s/SKILL.md").read_text() == "edited by a person"

    write(plugin / "skills" / "s" / "SKILL.md", "as snapshotted")
    real_fsync = os.fsync

    def meanwhile(fd: int) -> None:  # the person saves the bundled file while overnight writes it
        real_fsync(fd)
        if not (plugin / "skills/s/references/a.md").exists():
            write(plugin / "skills/s/references/a.md", "the person's")
    monkeypatch.setattr(os, "fsync", meanwhile)
    with pytest.raises(WriteError, match="^skills/s/references/a.md changed since"):
        apply(plugin, files, [], before)
    assert (plugin / "skills/s/references/a.md").read_text() == "the person's"
    assert leftovers(plugin) == []


def test_cleanup_temp_recovers_an_interrupted_swap(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugin = plugins / "p"
    write(plugin / "README.md", "new tree")
    write(plugin / "deep" / f".x.md.overnight-tmp-{HEX}", "partial")
    write(plugins / f".p.overnight-old-{HEX}" / "README.md", "old tree")
    write(plugins / f".p.overnight-old-{HEX}" / ".git" / "HEAD", "git")
    write(plugins / f".p.overnight-restore-{HEX}" / "README.md", "half built")
    write(plugins / f".q.overnight-restore-{HEX}" / "README.md", "another plugin's")
    assert cleanup_temp(plugin.parent, plugin) == 3
    assert (plugin / ".git" / "HEAD").read_text() == "git"  # carried over, not deleted
    assert (plugin / "README.md").read_text() == "new tree"
    assert sorted(p.name for p in plugins.iterdir()) == [f".q.overnight-restore-{HEX}", "p"]
    assert leftovers(plugin) == []

    # Killed between the two renames of the swap: the old tree comes back.
    os.rename(plugin, plugins / f".p.overnight-old-{HEX}")
    write(plugins / f".p.overnight-restore-{'f' * 16}" / "README.md", "complete but not swapped in")
    assert cleanup_temp(plugin.parent, plugin) == 2
    assert (plugin / "README.md").read_text() == "new tree"


# ------------------------------------------------------------------ crashes

# The child does the job with slow fsyncs (so timed kills land mid-job), and can also kill
# itself right after its n-th rename: the exact moments a crash is most likely to hurt.
CHILD = """
import json, os, signal, sys, time
from pathlib import Path
from statemachine.snapshots import restore
from statemachine.writes import apply
job = json.loads(Path(sys.argv[1]).read_text())
real_fsync, real_rename, renames = os.fsync, os.rename, [0]
def slow_fsync(fd):
    time.sleep(0.002)
    real_fsync(fd)
def rename(*args, **kwargs):
    real_rename(*args, **kwargs)
    renames[0] += 1
    if renames[0] == job.get("crash_after_rename"):
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync, os.rename = slow_fsync, rename
print("go", flush=True)
if job["kind"] == "apply":
    apply(Path(job["plugin"]), {k: v.encode() for k, v in job["files"].items()},
          [tuple(m) for m in job["moves"]], job["before"])
else:
    blobs = Path(job["blobs"])
    restore(lambda h: (blobs / h).read_bytes(), Path(job["root"]), Path(job["plugin"]), job["tree"])
"""


def run_child(job: dict, point: tuple[str, float]) -> float:
    """Run CHILD on `job`, crashing at `point`: ("after", seconds of work), ("rename", n),
    or ("never", 0). Returns how long the child worked."""
    how, at = point
    path = Path(job["plugin"]).parent / "job.json"
    path.write_text(json.dumps({**job, "crash_after_rename": at if how == "rename" else None}))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=PROJECT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "go\n"
    started = time.monotonic()
    if how == "after":
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=20)
    if how == "never":
        assert proc.returncode == 0
    path.unlink()
    return time.monotonic() - started


def crash_points(job: dict, reset, renames: list[int], timed: int = 4) -> list[tuple[str, float]]:
    """Kills spread over one full uninterrupted run of the job, then after chosen renames."""
    reset()
    duration = run_child(job, ("never", 0))
    return [("after", duration * i / timed) for i in range(timed)] + [("rename", n) for n in renames]


def test_apply_killed_at_any_point_then_rerun_gives_exact_tree(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # only the killed child needs durability
    plugin = tmp_path / "work" / "p"
    old = {"skills/skill-adapter/SKILL.md": "old skill", "README.md": "readme"}
    files = {f"skills/new/references/r{i:02}.md": f"reference {i}\n" * (200 * i + 1) for i in range(12)}
    files["skills/new/SKILL.md"] = "new skill\n" * 500
    moves = [("skills/skill-adapter", "skills/new")]
    moved_old = {"skills/new/SKILL.md": "old skill"}
    before = {rel: sha(moved_old[rel].encode()) if rel in moved_old else None for rel in files}
    job = {"kind": "apply", "plugin": str(plugin), "files": files, "moves": moves, "before": before}

    def reset() -> None:
        subprocess.run(["rm", "-rf", str(plugin)], check=True)
        for rel, text in old.items():
            write(plugin / rel, text)

    points = crash_points(job, reset, renames=[1, 2, 8])
    expected = listing(plugin)
    for point in points:
        reset()
        run_child(job, point)
        for rel, text in files.items():  # each target holds its old bytes or all the new ones
            path = plugin / rel
            assert not path.exists() or path.read_text() in (text, moved_old.get(rel)), point
        cleanup_temp(plugin.parent, plugin)
        apply(plugin, {k: v.encode() for k, v in files.items()}, moves, before)
        assert listing(plugin) == expected, point
        assert settled(plugin, {k: sha(v.encode()) for k, v in files.items()}, moves)


def test_restore_killed_at_any_point_leaves_old_or_new_tree(market: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # only the killed child needs durability
    plugin = market / "plugins" / "p"
    for i in range(6):
        write(plugin / "docs" / f"d{i}.md", f"doc {i}\n" * 300)
    snap = take(market, plugin)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for blob in snap.blobs:
        (blobs / sha(blob)).write_bytes(blob)
    snapshotted = listing(plugin)
    template = tmp_path / "edited"
    (plugin / "README.md").write_text("edited")
    for i in range(3):
        (plugin / "docs" / f"d{i}.md").unlink()
    write(plugin / ".git" / "HEAD", "git")
    subprocess.run(["cp", "-a", str(plugin), str(template)], check=True)
    old = listing(plugin)
    new = {**snapshotted, ".git": old[".git"], ".git/HEAD": old[".git/HEAD"]}

    def reset() -> None:
        subprocess.run(["rm", "-rf", str(plugin)], check=True)
        subprocess.run(["cp", "-a", str(template), str(plugin)], check=True)

    job = {"kind": "restore", "root": str(market), "plugin": str(plugin), "blobs": str(blobs),
           "tree": snap.tree_sha256}
    outcomes = []
    # Renames: plugin -> old tree, built tree -> plugin, .git carried over from the old tree.
    for point in crash_points(job, reset, renames=[1, 2, 3]):
        reset()
        run_child(job, point)
        cleanup_temp(plugin.parent, plugin)
        now = listing(plugin)
        assert now in (old, new), point
        outcomes.append(now == new)
        restore(lambda h: (blobs / h).read_bytes(), market, plugin, snap.tree_sha256)
        assert listing(plugin) == new, point
        assert leftovers(market) == []
    assert outcomes[-3:] == [False, True, True]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a read-only bind mount needs root and unshare(1)")
def test_a_write_onto_a_read_only_disk_meets_the_disk_not_a_permission(tmp_path):
    """Checked before the first file, a read-only disk looked like a directory this user may not
    write: the plugin failed, where a read-only disk stops the run (EROFS, for `resume`)."""
    plugin_dir = tmp_path / "plugin"
    (plugin_dir / "skills").mkdir(parents=True)
    script = (
        "import sys\n"
        "from statemachine.writes import apply\n"
        "from statemachine.pipeline import _machine_fault\n"
        "try:\n"
        "    apply(sys.argv[1], {'skills/x/SKILL.md': b'new'}, [], {'skills/x/SKILL.md': None})\n"
        "except Exception as e:\n"
        "    print('machine fault' if _machine_fault(e) else type(e).__name__, e)\n")
    # the mount lives as long as this private mount namespace: it goes away by itself
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && exec "$2" -c "$3" "$1"', "sh",
         str(plugin_dir), sys.executable, script], cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("machine fault "), (done.stdout, done.stderr)
    assert done.stdout.endswith(": Read-only file system\n")
    assert list((plugin_dir / "skills").iterdir()) == []
