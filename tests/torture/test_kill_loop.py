"""Part 1: SIGKILL at random instants, `overnight resume` after each, invariants after every kill."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.torture import (bump, CORPUS, FULL, build_corpus, cli, db_of, has_run, migrated, posts,
                           query, quota_windows, record, repeated_answers, spawn, tree_hashes,
                           FaultyEmulator, KEY)

KILLS = 200 if FULL else 8
PLUGINS = 120 if FULL else 10
RPM = 600
CONCURRENCY = 2
ARGS = ["--rpm", str(RPM), "--rpd", "1000000", "--backoff", "0.05", "--concurrency", str(CONCURRENCY),
        "--timeout", "2", "--max-attempts", "6"]


def make_market(root: Path, round_no: int) -> str:
    if FULL and os.environ.get("OVERNIGHT_TORTURE_CORPUS") == "shared" and CORPUS.joinpath("plugins").is_dir():
        shutil.copytree(CORPUS, root, symlinks=True, ignore=shutil.ignore_patterns(".overnight"))
        for path in [root, *root.rglob("*")]:  # the shared copy is read-only
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        return f"a copy of ../shared/corpus ({len(list(root.glob('plugins/*/*/.claude-plugin')))} plugin dirs)"
    build_corpus(root, PLUGINS, seed=100 + round_no)
    return f"a generated corpus of {PLUGINS} plugins (corpus shape: categories, manifest, legacy skills)"


def check_after_kill(root: Path, original: dict[str, str], problems: list[str], label: str) -> None:
    db = db_of(root)
    verify = cli("audit", "verify", root)
    if verify.returncode != 0:
        problems.append(f"{label}: audit verify failed: {verify.stdout[-500:]} {verify.stderr[-500:]}")
    replay = cli("audit", "replay", root)
    if replay.returncode != 0:
        problems.append(f"{label}: replay differs from the live projections: {replay.stdout[-500:]}")
    recorded = {h for (h,) in query(db, "SELECT hash FROM blobs")}
    for rel, digest in tree_hashes(root).items():
        if rel.endswith("/") or "overnight-tmp-" in rel:
            continue  # directories; an unfinished temp file is never a target (removed on resume)
        if original.get(rel) != digest and digest not in recorded:
            problems.append(f"{label}: partial or unknown file {rel}")
    problems.extend(f"{label}: {p}" for p in repeated_answers(db))
    for model, peak in quota_windows(db).items():
        if peak > RPM:
            problems.append(f"{label}: quota ledger holds {peak} requests of {model} in 60 s (limit {RPM})")


def test_kill_loop(tmp_path):
    rng = random.Random(20261122)
    kills = checks = rounds = requests = faults_seen = retries_total = 0
    problems: list[str] = []
    plugins_done = 0
    description = ""
    started = time.monotonic()
    with FaultyEmulator(api_key=KEY, latency=(0.05, 0.3), seed=11, rate=0.05, fault_seed=5,
                        quota_value=RPM) as emu:
        while kills < KILLS:
            root = tmp_path / f"round{rounds}"
            description = make_market(root, rounds)
            rounds += 1
            original = tree_hashes(root)
            db = db_of(root)
            before = len(posts(emu))
            round_kills = 0
            last_runs_events = 0
            while kills < KILLS:
                if has_run(db) and not query(db, "SELECT count(*) FROM runs WHERE status != 'complete'")[0][0]:
                    break  # the last kill landed after the run recorded its end
                proc = spawn("resume" if has_run(db) else "run", root,
                             *(["--base-url", emu.url, *ARGS] if not has_run(db) else []),
                             stdout=subprocess.DEVNULL)
                try:
                    code = proc.wait(timeout=rng.uniform(0.3, 4.0 if FULL else 1.5))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    round_kills += 1
                else:
                    err = proc.stderr.read().decode(errors="replace")
                    assert code == 0, f"run/resume exited {code} without being killed: {err}"
                    if query(db, "SELECT count(*) FROM runs WHERE status != 'complete'")[0][0] == 0:
                        break
                finally:
                    if proc.stderr:
                        proc.stderr.close()
                if not migrated(db):
                    continue  # killed before the log existed
                runs_events = query(db, "SELECT count(*) FROM events WHERE type IN ('RunStarted', 'RunResumed')")[0][0]
                if runs_events == last_runs_events:
                    bump("kill_loop", "kills before the run was recorded (start-up, scan)")
                last_runs_events = runs_events
                check_after_kill(root, original, problems, f"round {rounds} kill {round_kills}")
                checks += 1
                assert len(problems) < 50, "\n".join(problems[:50])
            unfinished = not has_run(db) or query(db, "SELECT count(*) FROM runs WHERE status != 'complete'")[0][0]
            if unfinished:  # (a kill can land after the run recorded its end)
                final = spawn("resume" if has_run(db) else "run", root,
                              *(["--base-url", emu.url, *ARGS] if not has_run(db) else []), stdout=subprocess.DEVNULL)
                assert final.wait(timeout=1800) == 0, final.stderr.read().decode()
                final.stderr.close()
            sent = len(posts(emu)) - before
            states = dict(query(db, "SELECT state, count(*) FROM plugins GROUP BY state"))
            selectable = sum(n for s, n in states.items() if s != "invalid")
            # the generated plugins have no SKILL.md passing the gates: each must end done
            for pid, state, reason in query(db, "SELECT plugin_id, state, reason FROM plugins WHERE state != 'done'"):
                problems.append(f"round {rounds}: {pid} ended {state} ({reason}), not done: "
                                + " ".join(t for (t,) in query(db, "SELECT type FROM events WHERE stream = ? "
                                                                   "ORDER BY seq", "plugin:" + pid)[-8:]))
            retries = query(db, "SELECT count(*) FROM events WHERE type IN ('RequestFailed', 'SkillGateFailed')")[0][0]
            ledger = query(db, "SELECT count(*) FROM quota_ledger")[0][0]
            # zero requests for answers already recorded
            assert sent <= 2 * selectable + round_kills * CONCURRENCY + retries, (sent, selectable, round_kills, retries)
            assert sent <= ledger, "a request reached the API without a request event"
            assert not [p for p in root.rglob("*") if "overnight-tmp-" in p.name], "temp files left after resume"
            check_after_kill(root, original, problems, f"round {rounds} final")
            for model, peak in quota_windows(db).items():
                record("kill_loop", peak_requests_in_60s=max(peak, 0))
            requests += sent
            retries_total += retries
            plugins_done += states.get("done", 0)
        faults_seen = sum(emu.injected.values())
    record("kill_loop", kills=kills, checks_after_restart=checks, rounds=rounds, marketplace=description,
           plugins_done=plugins_done, gemini_requests=requests, injected_faults=faults_seen,
           fault_rate="5%", recorded_retries=retries_total, rpm_limit=RPM,
           seconds=round(time.monotonic() - started), problems=len(problems))
    if problems:
        record("kill_loop", problem_list=problems[:10])
    assert not problems, "\n".join(problems[:20])
    assert kills >= KILLS
