"""Part 5: a recognisable fake key and token never reach the database, logs, backups or crash
output. Part 6: a second `overnight run` on the same marketplace refuses; the first is unharmed."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.torture import (KEY, REPO, FaultyEmulator, build_corpus, cli, db_of, posts, query, record,
                           spawn)

TOKEN = "fake-token-TORTURE-5ecr3t-77aa01"
ARGS = ["--rpm", "1000", "--rpd", "100000", "--backoff", "0.05", "--concurrency", "2"]
HAS_BACKUP = (REPO / "cli" / "backup.py").exists()


def wait_for_requests(emu, proc, n: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(posts(emu)) < n:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline
        time.sleep(0.05)


def scan_for(paths: list[Path], texts: dict[str, str], needles: list[bytes]) -> list[str]:
    leaks = []
    for path in paths:
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            data = file.read_bytes()
            leaks += [f"{file}: {n.decode()}" for n in needles if n in data]
    for label, text in texts.items():
        leaks += [f"{label}: {n.decode()}" for n in needles if n.decode() in text]
    return leaks


def test_secrets_never_leave_the_environment(tmp_path):
    root = tmp_path / "market"
    build_corpus(root, 4, seed=3)
    jsonl = tmp_path / "events.jsonl"
    outputs: dict[str, str] = {}
    env = {"TURSO_AUTH_TOKEN": TOKEN, "LIBSQL_AUTH_TOKEN": TOKEN}
    with FaultyEmulator(api_key=KEY, seed=4, rate=0, latency=(0.1, 0.3)) as emu:
        emu.script("rate_limit_minute", retry_delay="1s")
        emu.script("server_error", message="upstream echoed nothing")
        # a crash: SIGKILL in the middle, with --debug
        proc = spawn("run", root, "--base-url", emu.url, *ARGS, "--json-log", jsonl, "--debug", **env)
        wait_for_requests(emu, proc, 2)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        outputs["sigkill stdout/stderr"] = out.decode(errors="replace") + err.decode(errors="replace")
        # a clean interruption, then resume to the end
        sent = len(posts(emu))
        proc = spawn("resume", root, "--debug", **env)
        wait_for_requests(emu, proc, sent + 1)  # under way, with most of its requests still to send
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
        outputs["sigterm output"] = out.decode(errors="replace") + err.decode(errors="replace")
        final = cli("resume", root, "--debug", **env)
        outputs["resume output"] = final.stdout + final.stderr
        assert final.returncode == 0, final.stderr
        # errors that print: a rejected key echoes nothing of it; an unreachable endpoint
        other = tmp_path / "other"
        build_corpus(other, 1, seed=5)
        bad = cli("run", other, "--base-url", emu.url, *ARGS, "--debug", key=KEY + "-wrong", **env)
        outputs["rejected key"] = bad.stdout + bad.stderr
        assert bad.returncode == 1
        dead = cli("run", other, "--base-url", "http://127.0.0.1:9", *ARGS, "--timeout", "1",
                   "--max-attempts", "1", "--debug", **env)
        outputs["unreachable endpoint"] = dead.stdout + dead.stderr
        for args in (("status", root, "--json"), ("audit", "log", root, "--json")):
            r = cli(*args, **env)
            outputs[" ".join(map(str, args[:2]))] = r.stdout + r.stderr
        assert all(r.api_key_present for r in emu.requests)
    paths = [root / ".overnight", other / ".overnight", jsonl]
    backup_note = "not tested: cli/backup.py did not exist"
    if HAS_BACKUP:
        target = tmp_path / "backup.db"
        url = f"file:{target}"
        b = cli("backup", root, "--to", url, "--debug", **env)
        outputs["backup"] = b.stdout + b.stderr
        assert b.returncode == 0, b.stdout + b.stderr
        v = cli("backup", "verify", "--from", url, "--debug", **env) if "--from" in cli("backup", "verify", "--help").stdout \
            else cli("backup", "verify", url, **env)
        outputs["backup verify"] = v.stdout + v.stderr
        restored = tmp_path / "restored"
        r = cli("restore", "--from", url, "--to", restored, "--debug", **env)
        outputs["restore"] = r.stdout + r.stderr
        assert r.returncode == 0, r.stdout + r.stderr
        paths += [target, restored]
        paths += [p for p in tmp_path.glob("backup.db*") if p != target]
        backup_note = f"backup to {url.split(':')[0]}: URL, verify and restore: checked"
    leaks = scan_for(paths, outputs, [KEY.encode(), TOKEN.encode(), KEY[-12:].encode(), TOKEN[-12:].encode()])
    assert not leaks, "\n".join(leaks)
    files = sum(1 for p in paths for _ in ([p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]))
    record("secrets", files_scanned=files, outputs_scanned=len(outputs), leaks=0, backups=backup_note)


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def test_a_second_run_refuses_and_the_first_is_unharmed(tmp_path):
    root = tmp_path / "market"
    build_corpus(root, 4, seed=6)
    # 8 requests of 1.5 s, two at a time: the first run lasts about 6 s, and the other two
    # commands start together (each takes a Python start-up) while it is in its first request
    with FaultyEmulator(api_key=KEY, seed=4, rate=0, latency=(1.5, 1.7)) as emu:
        first = spawn("run", root, "--base-url", emu.url, *ARGS)
        wait_for_requests(emu, first, 1)
        seen = len(posts(emu))
        second_proc = spawn("run", root, "--base-url", emu.url, *ARGS)
        third_proc = spawn("resume", root)
        second, third = finished(second_proc), finished(third_proc)
        assert first.poll() is None, "the first run ended before the second started: the test proved nothing"
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
        first.stderr.close()
        first.stdout.close()
    for refused in (second, third):
        assert refused.returncode == 3, (refused.returncode, refused.stderr)
        assert refused.stderr.startswith("error: ") and "in use by another overnight process" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    db = db_of(root)
    assert query(db, "SELECT count(*) FROM runs")[0][0] == 1
    assert dict(query(db, "SELECT state, count(*) FROM plugins GROUP BY state")) == {"done": 4}
    assert cli("audit", "verify", root).returncode == 0
    assert cli("audit", "replay", root).returncode == 0
    assert len(posts(emu)) == 8 and seen >= 1
    record("two_runs", second_run_exit=second.returncode, message=second.stderr.strip(),
           resume_during_run_exit=third.returncode, first_run="complete, 4/4 done, verify and replay ok")
