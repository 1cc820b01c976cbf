"""Crash and signal safety of `overnight run` / `resume`, with real processes killed for real."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import apsw
import pytest

from tests.emulator import Emulator
from tests.marketplace_builder import manifest, plugin

KEY = "fake-key-CRASH-5d1e"
REPO = Path(__file__).resolve().parent.parent
ARGS = ["--rpm", "100000", "--rpd", "1000000", "--backoff", "0.05", "--concurrency", "2"]


def build_marketplace(root: Path, count: int) -> None:
    entries = []
    for i in range(count):
        name = f"tool-{i:02d}"
        entries.append({"name": name, "source": f"./plugins/cat{i % 3}/{name}", "category": f"cat{i % 3}"})
        plugin(root, f"plugins/cat{i % 3}/{name}", name, description=f"Tool number {i}.",
               files={"README.md": f"# {name}\n\nDoes task {i} well.\n",
                      "commands/go.md": f"# /go\n\nRun task {i}.\n"})
    manifest(root, entries)


def spawn(command: str, root: Path, url: str, *extra: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    env["GOOGLE_API_KEY"] = KEY
    return subprocess.Popen([sys.executable, "-m", "cli", command, str(root), "--base-url", url, *ARGS, *extra]
                            if command == "run" else
                            [sys.executable, "-m", "cli", command, str(root)],
                            cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE,
                            # as from a terminal, even when the tests run under nohup (SIGHUP ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))


def first_request(emu: Emulator, proc: subprocess.Popen) -> None:
    """Wait until the run has sent its first request to Gemini."""
    deadline = time.monotonic() + 30
    while not [r for r in emu.requests if r.method == "POST"]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True)


def query(root: Path, sql: str) -> list[tuple]:
    conn = apsw.Connection(str(root / ".overnight" / "overnight.db"))
    conn.setbusytimeout(5000)  # the run may be checkpointing the WAL right now
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and ".overnight" not in p.parts}


def migrated(root: Path) -> bool:
    db = root / ".overnight" / "overnight.db"
    return db.exists() and query(root, "PRAGMA user_version")[0][0] > 0


def has_run(root: Path) -> bool:
    # a run's table exists once the log does (created in its schema's transaction); its row, once a run began
    return (migrated(root) and bool(query(root, "SELECT 1 FROM sqlite_schema WHERE name = 'runs'"))
            and bool(query(root, "SELECT 1 FROM runs LIMIT 1")))


def test_sigkill_at_random_instants_then_resume_loses_and_repeats_nothing(tmp_path):
    root = tmp_path / "market"
    build_marketplace(root, 24)
    original = tree_hashes(root)
    rng = random.Random(20261122)
    kills = 0
    with Emulator(api_key=KEY, latency=(0.02, 0.12), seed=3) as emu:
        while kills < 20:
            proc = spawn("resume" if has_run(root) else "run", root, emu.url)
            try:
                proc.wait(timeout=rng.uniform(0.4, 1.6))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                if proc.returncode == 0 and query(root, "SELECT status FROM runs")[0][0] == "complete":
                    break  # finished before the next kill
            if not migrated(root):
                continue  # killed before the log existed
            assert cli("audit", "verify", str(root)).returncode == 0
            recorded = {digest for (digest,) in query(root, "SELECT hash FROM blobs")}
            for rel, digest in tree_hashes(root).items():
                if "overnight-tmp-" in rel:
                    continue  # an unfinished temp file: never a target, removed on resume
                assert digest in recorded or original.get(rel) == digest, f"partial or unknown file {rel}"
        final = spawn("resume" if has_run(root) else "run", root, emu.url)
        assert final.wait(timeout=120) == 0, final.stderr.read().decode()
        sent = [r for r in emu.requests if r.method == "POST"]

    assert kills >= 10, "the batch finished too early to test crashes"
    assert query(root, "SELECT state, count(*) FROM plugins GROUP BY state") == [("done", 24)]
    retries = query(root, "SELECT count(*) FROM events WHERE type IN ('RequestFailed', 'SkillGateFailed')")[0][0]
    assert len(sent) <= 2 * 24 + kills * 2 + retries
    # a recorded answer is never requested again: one plan and one skill answer per plugin
    per_plugin = query(root, "SELECT stream, sum(type = 'PlanReceived'), sum(type = 'SkillReceived') "
                             "FROM events WHERE stream LIKE 'plugin:%' GROUP BY stream")
    assert {(p, s) for _, p, s in per_plugin} == {(1, 1)}
    assert query(root, "SELECT count(*) FROM quota_ledger")[0][0] == len(sent)
    # every request a killed process left without an answer was recorded as lost by the next one
    assert query(root, "SELECT count(*) FROM quota_ledger WHERE outcome = 'pending'") == [(0,)]
    assert not [p for p in root.rglob("*") if "overnight-tmp-" in p.name]
    assert cli("audit", "verify", str(root)).returncode == 0
    assert cli("audit", "replay", str(root)).returncode == 0
    for skill in root.glob("plugins/*/*/skills/*/SKILL.md"):
        assert cli("status", str(root)).returncode == 0
        from skills_ref.validator import validate
        assert validate(skill.parent) == []


def answered_once(root: Path, emu: Emulator) -> None:
    """Every request the emulator received is in the ledger, and no plugin was answered twice."""
    sent = [r for r in emu.requests if r.method == "POST"]
    assert query(root, "SELECT count(*) FROM quota_ledger")[0][0] == len(sent)
    per_plugin = query(root, "SELECT sum(type = 'PlanReceived'), sum(type = 'SkillReceived') FROM events "
                             "WHERE stream LIKE 'plugin:%' GROUP BY stream")
    assert set(per_plugin) == {(1, 1)}, per_plugin


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_stops_cleanly_records_the_interruption_and_resume_finishes(tmp_path, sig, code):
    """SIGINT and SIGTERM wait for the answers under way and record them (resume does not pay
    for them again); SIGHUP, whose terminal is gone, does not wait: those requests are lost."""
    root = tmp_path / "market"
    build_marketplace(root, 6)
    name = signal.Signals(sig).name
    with Emulator(api_key=KEY, latency=(1.0, 1.0), seed=5) as emu:
        proc = spawn("run", root, emu.url)
        first_request(emu, proc)
        proc.send_signal(sig)  # a request is in flight: Gemini takes a second to answer
        assert proc.wait(timeout=10) == code
        stderr = proc.stderr.read().decode()
        assert f"\nerror: interrupted by {name}\n" in stderr  # as the README says
        assert query(root, "SELECT json_extract(data, '$.signal') FROM events WHERE type = 'RunInterrupted'") == [
            (name,)]
        assert query(root, "SELECT status FROM runs") == [("interrupted",)]
        # the clean stop settled its requests in flight itself: none is left pending
        assert query(root, "SELECT count(*) FROM quota_ledger WHERE outcome = 'pending'") == [(0,)]
        lost = query(root, "SELECT request_id FROM quota_ledger WHERE outcome = 'lost'")
        assert len(lost) == query(root, "SELECT count(*) FROM events WHERE type = 'RequestLost'")[0][0]
        assert json.loads(cli("metrics", str(root), "--json").stdout)["lost"] == len(lost)
        if sig == signal.SIGHUP:
            assert lost and "waiting for" not in stderr
        else:
            assert not lost and query(root, "SELECT count(*) FROM quota_ledger WHERE outcome = 'ok'")[0][0] >= 1
            assert f"stopping ({name}): waiting for the " in stderr, stderr
            assert f"a second {'Ctrl-C' if name == 'SIGINT' else 'signal'} stops at once" in stderr
        assert cli("audit", "verify", str(root)).returncode == 0
        assert spawn("resume", root, emu.url).wait(timeout=60) == 0
        if sig != signal.SIGHUP:
            answered_once(root, emu)
    assert query(root, "SELECT state, count(*) FROM plugins GROUP BY state") == [("done", 6)]
    assert query(root, "SELECT status FROM runs") == [("complete",)]


def test_a_second_sigint_stops_at_once_without_the_answers_under_way(tmp_path):
    root = tmp_path / "market"
    build_marketplace(root, 4)
    with Emulator(api_key=KEY, latency=(20.0, 20.0), seed=5) as emu:
        proc = spawn("run", root, emu.url)
        first_request(emu, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # it waits for the answer, 20 s away
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 130
        assert "\nerror: interrupted by SIGINT\n" in proc.stderr.read().decode()
        assert query(root, "SELECT outcome, count(*) FROM quota_ledger GROUP BY outcome") == [
            ("lost", len([r for r in emu.requests if r.method == "POST"]))]
        assert query(root, "SELECT json_extract(data, '$.signal') FROM events WHERE type = 'RunInterrupted'") == [
            ("SIGINT",)]


def test_a_run_stopped_by_a_signal_names_the_plugins_its_scan_found_invalid(tmp_path):
    """The interrupted run's summary listed no invalid plugin, and its resume counted them as
    found before: their names were never shown."""
    root = tmp_path / "market"
    build_marketplace(root, 3)
    plugin(root, "plugins/cat0/broken", None)  # no name: invalid
    with Emulator(api_key=KEY, latency=(1.0, 1.0), seed=5) as emu:
        proc = spawn("run", root, emu.url, stdout=subprocess.PIPE)
        first_request(emu, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "  invalid     plugins/cat0/broken: " in out.decode(), out


def test_metrics_from_another_terminal_gives_an_eta_the_quota_allows(tmp_path):
    """The first plugin is done in a burst, well inside the minute's quota: its pace alone told
    `metrics` the other five would take seconds. At 4 requests a minute their ten requests take
    two minutes or more (what the run's own progress line says too)."""
    root = tmp_path / "market"
    build_marketplace(root, 6)
    with Emulator(api_key=KEY, seed=3) as emu:
        proc = spawn("run", root, emu.url, "--rpm", "4", "--concurrency", "1")
        try:
            deadline = time.monotonic() + 60
            while not (has_run(root) and query(root, "SELECT 1 FROM plugins WHERE state = 'done'")):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
            measured = json.loads(cli("metrics", str(root), "--json").stdout)["run"]
        finally:
            proc.kill()
            proc.wait()
    # 4 or 5 plugins left (a second one may be done in the first minute): 8 or 10 requests
    assert measured["status"] == "running" and measured["finished"] in (1, 2), measured
    assert 110 <= measured["eta_s"] <= 151, measured


def test_metrics_gives_an_eta_before_the_first_plugin_is_done(tmp_path):
    root = tmp_path / "market"
    build_marketplace(root, 6)
    with Emulator(api_key=KEY, latency=(1.0, 1.0), seed=3) as emu:
        proc = spawn("run", root, emu.url, "--rpm", "4")
        try:
            first_request(emu, proc)
            measured = json.loads(cli("metrics", str(root), "--json").stdout)["run"]
        finally:
            proc.kill()
            proc.wait()
    assert measured["status"] == "running" and measured["finished"] == 0, measured
    # 12 requests at 4 a minute: the last goes two minutes from now
    assert 110 <= measured["eta_s"] <= 151, measured


def test_a_second_run_is_refused_also_when_it_keeps_its_log_elsewhere(tmp_path):
    """The log's lock refused a second process on that log only: one with --db (or OVERNIGHT_DB)
    set, beside one without, took the same plugins and each counted only its own requests
    against the quota."""
    root = tmp_path / "market"
    build_marketplace(root, 6)
    other = tmp_path / "elsewhere.db"
    with Emulator(api_key=KEY, latency=(3.0, 3.0), seed=3) as emu:
        proc = spawn("run", root, emu.url)
        try:
            first_request(emu, proc)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
            for command in (["run", str(root), "--base-url", emu.url, "--db", str(other)],
                            ["restore-plugin", "tool-00", str(root), "--db", str(other)]):
                second = subprocess.run([sys.executable, "-m", "cli", *command], cwd=REPO, capture_output=True,
                                        text=True, env=env | {"GOOGLE_API_KEY": KEY})
                assert second.returncode == 3, second.stderr
                assert second.stderr == (f"error: the marketplace {root} is in use by another overnight process "
                                         f"(pid {proc.pid}); wait for it to finish or stop it first\n")
                assert second.stdout == ""
        finally:
            proc.kill()
            proc.wait()
    assert not other.exists()  # refused before its log was made, or any scan or request


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a bind mount needs root and unshare(1)")
def test_a_second_run_is_refused_when_it_reaches_the_marketplace_by_another_path(tmp_path):
    """The lock was named by the marketplace's real path: a bind mount of it (another path to the
    same directory) let a second run write its plugins beside the first."""
    root, other_path = tmp_path / "market", tmp_path / "mounted"
    build_marketplace(root, 6)
    other_path.mkdir()
    with Emulator(api_key=KEY, latency=(3.0, 3.0), seed=3) as emu:
        proc = spawn("run", root, emu.url)
        try:
            first_request(emu, proc)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
            # the mount lives as long as this private mount namespace: it goes away by itself
            second = subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount --bind "$1" "$2" && exec "$3" -m cli run "$2" --base-url "$4" --db "$5"', "sh",
                 str(root), str(other_path), sys.executable, emu.url, str(tmp_path / "elsewhere.db")],
                cwd=REPO, capture_output=True, text=True, env=env | {"GOOGLE_API_KEY": KEY})
            assert second.returncode == 3, second.stderr
            assert second.stderr == (f"error: the marketplace {other_path} is in use by another overnight process "
                                     f"(pid {proc.pid}); wait for it to finish or stop it first\n")
        finally:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "elsewhere.db").exists()


def test_status_tells_a_run_that_died_from_one_that_runs(tmp_path):
    root = tmp_path / "market"
    build_marketplace(root, 6)
    with Emulator(api_key=KEY, latency=(0.3, 0.4), seed=3) as emu:
        proc = spawn("run", root, emu.url)
        try:
            deadline = time.monotonic() + 60
            while not (has_run(root) and len(emu.requests) >= 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            live = json.loads(cli("status", str(root), "--json").stdout)["last_run"]
            time.sleep(1.5)  # answers keep coming: the run's last event is well after its start
        finally:
            proc.kill()
            proc.wait()
        assert live["status"] == "running"
        dead = json.loads(cli("status", str(root), "--json").stdout)["last_run"]
        assert dead["status"] == "stopped" and dead["run_id"] == live["run_id"]
        human = cli("status", str(root)).stdout
        assert f"no overnight process is running it: `overnight resume {root}` continues it" in human
        measured = json.loads(cli("metrics", str(root), "--json").stdout)["run"]
        assert measured["status"] == "stopped" and measured["eta_s"] is None
        # a killed run records no end: its wall time runs to its last event, a plugin's or a request's
        (started, last), = query(root, "SELECT min(at), max(at) FROM events WHERE seq >= "
                                       "(SELECT seq FROM events WHERE type = 'RunStarted')")
        wall = (datetime.fromisoformat(last) - datetime.fromisoformat(started)).total_seconds()
        assert measured["actual"]["elapsed_s"] == round(wall) >= 1
        resumed = spawn("resume", root, emu.url)
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
    assert json.loads(cli("status", str(root), "--json").stdout)["last_run"]["status"] == "complete"


def test_a_signal_ends_a_quota_pause_at_once(tmp_path):
    root = tmp_path / "market"
    build_marketplace(root, 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    with Emulator(api_key=KEY, seed=3) as emu:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(root), "--base-url", emu.url,
                                 "--rpm", "1000", "--rpd", "2", "--json"],  # the day is spent after two requests
                                cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                    has_run(root) and query(root, "SELECT status FROM runs")[0][0] == "paused"):
                time.sleep(0.05)
            assert query(root, "SELECT status FROM runs")[0][0] == "paused"
            # from another terminal: the ETA of the run a process waits on (it was null)
            measured = json.loads(cli("metrics", str(root), "--json").stdout)["run"]
            ((paused_until,),) = query(root, "SELECT paused_until FROM runs")
            assert measured["status"] == "paused" and measured["eta_s"] is not None
            assert measured["eta_s"] >= datetime.fromisoformat(paused_until).timestamp() - time.time() - 1, measured
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=15)  # the pause lasts until Pacific midnight; the old wait slept 30 s
        finally:
            proc.kill()
        assert code == 130, proc.stderr.read().decode()
        assert query(root, "SELECT status FROM runs")[0][0] == "interrupted"
        (until,) = query(root, "SELECT json_extract(data, '$.until') FROM events WHERE type = 'RunPaused'")[0]
        assert json.loads(proc.stdout.read())["paused_until"] == until  # as `status` says it (it said null)
        # resumed without waiting while the day is still spent: paused again, and status says so
        # (it said "paused" while the log kept the run interrupted)
        resumed = subprocess.run([sys.executable, "-m", "cli", "resume", str(root), "--no-wait", "--json"],
                                 cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY}, capture_output=True, text=True,
                                 timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert (json.loads(resumed.stdout)["outcome"], json.loads(resumed.stdout)["paused_until"]) == ("paused", until)
    last_run = json.loads(cli("status", str(root), "--json").stdout)["last_run"]
    assert (last_run["status"], last_run["paused_until"]) == ("paused", until)
    assert [t for t, in query(root, "SELECT type FROM events WHERE stream LIKE 'run:%' ORDER BY seq")][-2:] == [
        "RunResumed", "RunPaused"]


def test_larger_limits_on_resume_lift_a_pause_that_a_signal_cut_short(tmp_path):
    """Ctrl-C on a run sleeping out a 429's wait, then `resume --rpd N` for the paid tier: the
    run, recorded as interrupted, was not seen as paused, and slept out the wait again."""
    root = tmp_path / "market"
    build_marketplace(root, 1)
    with Emulator(api_key=KEY, seed=3) as emu:
        emu.script("rate_limit_day", retry_delay="90000.25s", phase="skill")
        proc = spawn("run", root, emu.url)
        try:
            deadline = time.monotonic() + 60
            while not (has_run(root) and query(root, "SELECT status FROM runs")[0][0] == "paused"):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 130
        finally:
            proc.kill()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
        resumed = subprocess.run([sys.executable, "-m", "cli", "resume", str(root), "--rpd", "1000", "--no-wait"],
                                 cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY}, capture_output=True, text=True,
                                 timeout=60)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ": complete; 1 plugin selected (done 1)" in resumed.stdout, resumed.stdout


@contextmanager
def killed_with_two_requests_in_flight(tmp_path: Path) -> Iterator[tuple[Path, Emulator]]:
    """A run of four plugins killed (SIGKILL) while two requests wait for their answers; the
    emulator stays up inside the block."""
    root = tmp_path / "market"
    build_marketplace(root, 4)
    with Emulator(api_key=KEY, latency=(1.5, 1.5), seed=9) as emu:
        proc = spawn("run", root, emu.url)
        deadline = time.monotonic() + 30
        while len([r for r in emu.requests if r.method == "POST"]) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        yield root, emu


def test_requests_in_flight_at_a_kill_are_recorded_as_lost_by_resume_and_counted_apart(tmp_path):
    with killed_with_two_requests_in_flight(tmp_path) as (root, emu):
        in_flight = query(root, "SELECT run_id, request_id FROM quota_ledger WHERE outcome = 'pending'")
        assert len(in_flight) == 2
        before = cli("metrics", str(root))
        assert "2 requests without an answer: the process that sent them stopped" in before.stdout
        assert json.loads(cli("metrics", str(root), "--json").stdout)["pending"] == 2
        assert spawn("resume", root, emu.url).wait(timeout=60) == 0

    assert query(root, "SELECT state, count(*) FROM plugins GROUP BY state") == [("done", 4)]
    assert query(root, "SELECT count(*) FROM quota_ledger WHERE outcome = 'pending'") == [(0,)]
    lost = query(root, "SELECT json_extract(data, '$.run_id'), json_extract(data, '$.request_id'), stream "
                       "FROM events WHERE type = 'RequestLost'")
    assert sorted(lost) == sorted((run, req, f"run:{run}") for run, req in in_flight)
    assert sorted(query(root, "SELECT run_id, request_id FROM quota_ledger WHERE outcome = 'lost'")) == sorted(in_flight)
    m = json.loads(cli("metrics", str(root), "--json").stdout)
    # the lost requests were sent (quota, ledger) and sent again; Gemini answered every one it got
    assert m["requests"] == 4 * 2 + 2 and m["lost"] == 2 and m["pending"] == 0
    assert m["retries"] == {"lost": 2} and m["success_rate"] == 1.0
    assert query(root, "SELECT retries FROM run_summary") == [(2,)]
    assert "retries by kind: lost 2" in cli("metrics", str(root)).stdout
    # nor does the estimate of doing it all again count them as the retries Gemini costs
    assert json.loads(cli("estimate", str(root), "--force", "--json").stdout)["requests"] == 4 * 2
    assert cli("audit", "verify", str(root)).returncode == 0
    assert cli("audit", "replay", str(root)).returncode == 0


def test_budgets_count_the_requests_a_killed_run_left_unanswered_at_their_estimate(tmp_path):
    """Gemini may well have billed a request whose answer its killed process never got."""
    with killed_with_two_requests_in_flight(tmp_path) as (root, _emu):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
        resumed = subprocess.run([sys.executable, "-m", "cli", "resume", str(root), "--max-tokens", "100", "--json"],
                                 cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["outcome"] == "budget_exhausted"
    ((estimated,),) = query(root, "SELECT sum(est_input_tokens) FROM quota_ledger WHERE outcome = 'lost'")
    assert query(root, "SELECT json_extract(data, '$.used') FROM events WHERE type = 'BudgetExhausted'") == [
        (estimated + 2 * 900,)]  # two plans: their prompts, and the default answer before any was seen
    # metrics count them as the budget did (they left them out: a cost below what --max-cost had counted)
    m = json.loads(cli("metrics", str(root), "--json").stdout)
    ((answered_in,),) = query(root, "SELECT coalesce(sum(input_tokens), 0) FROM quota_ledger")
    assert m["estimated"] == {"requests": 2, "input_tokens": estimated, "output_tokens": 2 * 900}
    assert m["input_tokens"] == answered_in + estimated
    assert "(counting 2 requests never answered at their estimate, as the budgets do)" in cli("metrics", str(root)).stdout


def test_status_shows_an_older_unfinished_run_and_a_run_that_finishes_its_plugins_finishes_it(tmp_path):
    root = tmp_path / "market"
    build_marketplace(root, 4)

    def posts() -> int:
        return len([r for r in emu.requests if r.method == "POST"])

    def wait_for_posts(proc: subprocess.Popen, count: int) -> None:
        deadline = time.monotonic() + 30
        while posts() < count:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)

    def status() -> dict:
        return json.loads(cli("status", str(root), "--json").stdout)

    with Emulator(api_key=KEY, latency=(1.0, 1.0), seed=11) as emu:
        first = spawn("run", root, emu.url)
        wait_for_posts(first, 1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        (older,) = query(root, "SELECT run_id FROM runs")[0]
        second = spawn("run", root, emu.url, "--plugin", "tool-03")  # a new run, not a resume
        wait_for_posts(second, posts() + 1)
        live = status()
        newer = live["last_run"]["run_id"]
        assert newer != older and live["last_run"]["status"] == "running"
        # the killed run is recorded as running too, but the process holding the log runs the newer one
        assert [(r["run_id"], r["status"]) for r in live["unfinished_runs"]] == [(older, "stopped")]
        assert f"`overnight resume {root}` continues it after the run above" in cli("status", str(root)).stdout
        assert second.wait(timeout=30) == 0
        text = cli("status", str(root)).stdout
        assert (f"older run {older} is unfinished: stopped, 1 of 4 plugins finished; "  # tool-03, by the newer run
                f"`overnight resume {root}` continues it\n") in text
        resumed = spawn("resume", root, emu.url)
        wait_for_posts(resumed, posts() + 1)
        # while resume runs the older run, that run is the current one, and no hint says to resume it
        live = status()
        assert (live["last_run"]["run_id"], live["last_run"]["status"]) == (older, "running")
        assert live["unfinished_runs"] == [] and "continues it" not in cli("status", str(root)).stdout
        current = json.loads(cli("metrics", str(root), "--json").stdout)["run"]
        assert (current["run_id"], current["status"]) == (older, "running")
        assert resumed.wait(timeout=60) == 0

    assert query(root, "SELECT run_id, status FROM runs ORDER BY started_at") == [(older, "complete"), (newer, "complete")]
    # tool-03 is credited to the newer run that finished it, not to the older one too
    assert query(root, "SELECT json_extract(data, '$.counts'), json_extract(data, '$.by_other_runs') FROM events "
                       f"WHERE type = 'RunFinished' AND stream = 'run:{older}'") == [('{"done":3}', '{"done":1}')]
    assert query(root, "SELECT run_id, done FROM run_summary ORDER BY started_at") == [(older, 3), (newer, 1)]
    assert status()["unfinished_runs"] == []
    assert cli("audit", "verify", str(root)).returncode == 0
