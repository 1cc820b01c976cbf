"""Part 3: no space left (a small tmpfs), write errors (RLIMIT_FSIZE -> EFBIG) and fsync
failing with EIO (a VFS below SQLite) while appending events and while writing files: a clean
stop naming the cause, nothing corrupted, resume works once the disk does."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torture import (FULL, KEY, REPO, FaultyEmulator, build_corpus, child_env, cli, has_run, query, record,
                           repeated_answers, spawn, tree_hashes)

PLUGINS = 12 if FULL else 4
ARGS = ["--rpm", "1000", "--rpd", "100000", "--backoff", "0.05", "--concurrency", "2"]


def can_mount() -> bool:
    probe = Path("/tmp") / f"overnight-torture-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        probe.rmdir()


@pytest.fixture
def tmpfs(tmp_path):
    if not can_mount():
        pytest.skip("mount -t tmpfs is not permitted here")
    point = tmp_path / "tmpfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(point: Path, leave: int) -> Path:
    """Fill the file system at `point` until only about `leave` bytes are free."""
    filler = point / "filler"
    free = os.statvfs(point).f_bavail * os.statvfs(point).f_frsize
    with open(filler, "wb") as f:
        remaining = max(0, free - leave)
        chunk = b"\0" * (1 << 16)
        while remaining > 0:
            try:
                remaining -= f.write(chunk[:min(len(chunk), remaining)])
                f.flush()
            except OSError:
                break
    return filler


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def check_stop(code: int, out: str, err: str, words: tuple[str, ...]) -> str:
    """The stop is clean (exit 1, no traceback) and one line names the cause."""
    assert code == 1, f"exit {code}; stderr: {err[-2000:]}; stdout: {out[-1000:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert any(w in lines[0].lower() for w in words), lines[0]
    return lines[0]


def healthy(root: Path, db: Path) -> None:
    verify = cli("audit", "verify", root, "--db", db, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = cli("audit", "replay", root, "--db", db)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def done(root: Path, db: Path) -> dict:
    return dict(query(db, "SELECT state, count(*) FROM plugins GROUP BY state"))


def resume_to_the_end(root: Path, db: Path, emu: FaultyEmulator) -> None:
    """With the disk working again, `resume` (or `run`, if the fault struck before the run was
    recorded) finishes every plugin and leaves a healthy log."""
    again = spawn("resume", root, "--db", db) if has_run(db) else spawn(
        "run", root, "--db", db, "--base-url", emu.url, *ARGS)
    code, _, err = finish(again)
    assert code == 0, err[-3000:]
    healthy(root, db)
    assert set(done(root, db)) <= {"done", "skipped"}, done(root, db)


@pytest.mark.parametrize("where", ["events", "files"])
def test_no_space_left(tmp_path, tmpfs, where):
    if where == "events":  # the log on the full tmpfs, the marketplace on the ordinary disk
        root, db = tmp_path / "market", tmpfs / "log" / "overnight.db"
    else:  # the marketplace on the full tmpfs, the log on the ordinary disk
        root, db = tmpfs / "market", tmp_path / "log" / "overnight.db"
    build_corpus(root, PLUGINS, seed=7)
    original = tree_hashes(root)
    with FaultyEmulator(api_key=KEY, seed=2, rate=0) as emu:
        if where == "events":
            db.parent.mkdir(parents=True)
            # let the log be created and scanned with room, then take the room away
            assert cli("scan", root, "--db", db).returncode == 0
            filler = fill(tmpfs, leave=48 * 1024)
        else:
            filler = fill(tmpfs, leave=4 * 1024)
        code, out, err = finish(spawn("run", root, "--db", db, "--base-url", emu.url, *ARGS))
        line = check_stop(code, out, err, ("no space", "disk is full", "disk full", "space"))
        healthy(root, db)
        recorded = {h for (h,) in query(db, "SELECT hash FROM blobs")}
        for rel, digest in tree_hashes(root).items():
            assert (rel.endswith("/") or "overnight-tmp-" in rel or original.get(rel) == digest
                    or digest in recorded), rel
        filler.unlink()  # space returns
        resume_to_the_end(root, db, emu)
    assert not [p for p in root.rglob("*") if "overnight-tmp-" in p.name]
    record("disk_faults", **{f"ENOSPC while {'appending events' if where == 'events' else 'writing files'}":
                             f"clean stop: `` {line.replace(str(db), '<log>')[:160]} ``; verify ok; resume finished {PLUGINS} plugins"})


def _limit(size: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


@pytest.mark.parametrize("where", ["events"])  # RLIMIT_FSIZE cannot single out the files: the WAL grows too
def test_write_errors(tmp_path, where):
    root, db = tmp_path / "market", tmp_path / "log" / "overnight.db"
    build_corpus(root, PLUGINS, seed=8)
    if where == "files":  # a file the step must write is larger than the limit; the log stays small
        limit = 6 * 1024
    else:
        limit = 0
    with FaultyEmulator(api_key=KEY, seed=2, rate=0) as emu:
        db.parent.mkdir(parents=True)
        assert cli("scan", root, "--db", db).returncode == 0
        if where == "events":
            limit = db.stat().st_size + 64 * 1024
        code, out, err = finish(spawn("run", root, "--db", db, "--base-url", emu.url, *ARGS,
                                      preexec_fn=_limit(limit)))
        line = check_stop(code, out, err, ("too large", "file size", "efbig", "i/o", "disk"))
        healthy(root, db)
        resume_to_the_end(root, db, emu)
    record("disk_faults", **{f"EFBIG (RLIMIT_FSIZE {limit} bytes) while {'appending events' if where == 'events' else 'writing files'}":
                             f"clean stop: `` {line.replace(str(db), '<log>')[:160]} ``; verify ok; resume finished"})


# (syncs let through, mode): early in the run, later in it, and one failure on a disk that recovers
EIO_POINTS = [(4, "persistent"), (12, "once"), (30, "persistent")] + (
    [(1, "once"), (20, "persistent"), (45, "once")] if FULL else [])


@pytest.mark.parametrize("syncs,mode", EIO_POINTS)
def test_fsync_fails_with_eio(tmp_path, syncs, mode):
    """fsync of the log fails with EIO (tests/torture/failing_disk.py): a clean stop naming the
    disk error, a log that verifies on a working disk, and a resume that finishes without
    asking Gemini again for any answer it recorded."""
    root, db = tmp_path / "market", tmp_path / "log" / "overnight.db"
    build_corpus(root, PLUGINS, seed=9)
    with FaultyEmulator(api_key=KEY, seed=2, rate=0) as emu:
        db.parent.mkdir(parents=True)
        assert cli("scan", root, "--db", db).returncode == 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.torture.failing_disk", str(syncs), mode, "--",
             "run", str(root), "--db", str(db), "--base-url", emu.url, *ARGS],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        code, out, err = finish(proc)
        assert "failing disk: 0 sync(s) failed" not in err, "the fault never fired: move the point earlier"
        line = check_stop(code, out, err, ("disk i/o error",))
        assert "overnight resume" in line
        healthy(root, db)  # the disk works again
        answered = {kind: n for kind, n in query(db, "SELECT type, count(*) FROM events WHERE type IN "
                                                    "('PlanReceived', 'SkillReceived') GROUP BY type")}
        resume_to_the_end(root, db, emu)
    assert repeated_answers(db) == []
    record("disk_faults", **{f"EIO from fsync after {syncs} syncs ({mode})":
                             f"clean stop: `` {line.replace(str(db), '<log>')[:200]} ``; verify ok; Gemini answers "
                             f"recorded before it: {sum(answered.values())}, none asked for again; resume finished"})
