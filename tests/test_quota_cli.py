"""Budgets, limit changes on resume, `overnight metrics` and `overnight estimate`, the config
file, and what `run` tells a person (wrong usage, progress, pauses, the summary), end to end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from statemachine import scheduler
from tests.emulator import Emulator
from tests.test_run import (  # noqa: F401 (fixtures)
    FAST,
    KEY,
    REPO,
    emu,
    market,
    one,
    overnight,
    query,
    run,
    without_scan,
)


def progress_lines(result) -> list[str]:
    """The progress lines a run printed (not on a terminal) after its scan's."""
    assert without_scan(result.stderr) != result.stderr, result.stderr
    return without_scan(result.stderr).splitlines()


def test_a_request_budget_stops_cleanly_and_resume_with_a_larger_one_finishes(market, emu):
    stopped = run(market, emu, "--max-requests", "3", "--concurrency", "1", "--json")
    assert stopped.exit_code == 0, stopped.output
    summary = json.loads(stopped.stdout)
    assert summary["outcome"] == "budget_exhausted" and "requests budget reached" in summary["message"]
    assert len([r for r in emu.requests if r.method == "POST"]) == 3
    assert query(market, "SELECT json_extract(data, '$.budget'), json_extract(data, '$.used') "
                         "FROM events WHERE type = 'BudgetExhausted'") == [("requests", 3.0)]
    assert query(market, "SELECT status FROM runs") == [("budget_exhausted",)]
    assert (f"; `overnight resume {market}` with a larger --max-requests, --max-tokens or --max-cost continues it\n"
            in overnight("status", market).stdout)
    again = overnight("resume", market, "--max-requests", "2")
    assert again.exit_code == 0  # 3 spent already: nothing sent
    assert (f"\nrequests budget reached: 3 of 2: `overnight resume {market} --max-requests N` goes on with a "
            "larger budget\n") in again.stdout
    assert summary["budget"] == "requests"
    assert len([r for r in emu.requests if r.method == "POST"]) == 3
    finished = overnight("resume", market, "--max-requests", "100", "--json")
    assert finished.exit_code == 0, finished.output
    assert json.loads(finished.stdout)["outcome"] == "complete"
    assert len([r for r in emu.requests if r.method == "POST"]) == 8
    changes = query(market, "SELECT json_extract(data, '$.reason'), json_extract(data, '$.budgets.max_requests') "
                            "FROM events WHERE type = 'LimitsChanged' ORDER BY seq")
    assert changes == [("resume with --max-requests 2", 2), ("resume with --max-requests 100", 100)]


def test_a_plugin_a_429_told_to_wait_hours_pauses_a_later_run_instead_of_holding_it(market, emu):
    """Gemini's RetryInfo held one plugin for 12 hours; every later run, --no-wait or not,
    slept on it with nothing recorded and nothing said."""
    emu.script("rate_limit_day", retry_delay="43200s", phase="skill")
    first = run(market, emu, "--no-wait", "--concurrency", "1")
    assert first.exit_code == 0 and "daily quota used up: resume after " in first.stdout, first.output
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    later = subprocess.run([sys.executable, "-m", "cli", "run", str(market), "--base-url", emu.url, *FAST, "--no-wait"],
                           cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY}, capture_output=True, text=True,
                           timeout=120)  # it used to sleep for 12 hours
    assert later.returncode == 0, later.stderr
    (until,) = {u for (u,) in query(market, "SELECT json_extract(data, '$.until') FROM events "
                                            "WHERE type = 'RunPaused'")}
    assert f"daily quota used up: resume after {until} " in later.stdout


def test_a_run_whose_progress_reader_goes_away_goes_on_to_the_end(market, emu):
    """`overnight run ... 2>&1 | head -1`: the first progress line after the reader left raised
    BrokenPipeError, which stopped the run unrecorded and exited 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    command = " ".join([sys.executable, "-m", "cli", "run", str(market), "--base-url", emu.url, *FAST,
                        "--concurrency", "1"])
    piped = subprocess.run(["bash", "-c", f"{command} 2>&1 | head -1; exit ${{PIPESTATUS[0]}}"], cwd=REPO,
                           env={**env, "GOOGLE_API_KEY": KEY}, capture_output=True, text=True, timeout=120)
    assert piped.stdout == "scanning 4 plugins\n", piped.stdout  # the one line head took
    assert query(market, "SELECT status FROM runs") == [("complete",)]
    assert query(market, "SELECT state, count(*) FROM plugins GROUP BY state") == [("done", 4)]


def test_requests_whose_answer_did_not_come_in_time_count_toward_the_token_budget(one, emu):
    """Gemini goes on with a request the client stopped waiting for, and bills it: two timed-out
    SKILL.md requests counted nothing, and the run went past --max-tokens."""
    emu.script("timeout", times=2, delay=2, phase="skill")
    stopped = run(one, emu, "--timeout", "1", "--max-tokens", "12000", "--concurrency", "1", "--json")
    assert json.loads(stopped.stdout)["outcome"] == "budget_exhausted", stopped.output
    again = overnight("resume", one, "--json")  # the same budget, counted again from the log
    assert json.loads(again.stdout)["outcome"] == "budget_exhausted", again.output
    assert len([r for r in emu.requests if r.method == "POST"]) == 3  # the plan and the two timed out


def test_a_prompt_larger_than_the_tokens_per_minute_limit_fails_its_plugin_unsent(one, emu):
    """Gemini answers such a request with a 429 every time: it went again every minute, for
    ever, spending the day's requests."""
    result = run(one, emu, "--tpm", "500", "--json")
    assert result.exit_code == 1, result.output  # a plugin failed
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["state"] == "failed" and re.fullmatch(
        r"its plan prompt is about [\d,]+ tokens, more than the 500 tokens per minute allowed: it can never be "
        r"sent \(if your quota allows more, state it with --tpm\)", problem["reason"]), problem
    assert [r for r in emu.requests if r.method == "POST"] == []


def test_a_paused_runs_summary_counts_the_plugins_it_did_not_reach_and_lists_none(market, emu):
    """With --rpd 20 on a corpus of 272, each night's summary listed some 260 untouched plugins
    as problems, without a reason."""
    result = run(market, emu, "--rpd", "2", "--no-wait", "--concurrency", "1", "--json")
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "paused" and summary["by_state"] == {"done": 1, "analyzed": 3}, summary
    assert summary["problems"] == []
    text = overnight("resume", market)  # paused still: the day's two requests are spent
    assert "  analyzed  " not in text.stdout, text.stdout


def test_resume_applies_new_limits_from_that_moment_and_records_why(one, emu):
    emu.script("rate_limit_day", retry_delay=None, phase="skill")
    assert run(one, emu, "--no-wait", "--concurrency", "1").exit_code == 0
    resumed = overnight("resume", one, "--rpm", "7", "--concurrency", "3")
    # the day's quota is still used up (until the next Pacific midnight): it pauses again
    assert resumed.exit_code == 0
    change = query(one, "SELECT json_extract(data, '$.limits') , json_extract(data, '$.reason') "
                        "FROM events WHERE type = 'LimitsChanged'")
    limits, reason = change[0]
    assert json.loads(limits)["rpm"] == 7 and json.loads(limits)["concurrency"] == 3
    assert reason == "resume with --rpm 7, --concurrency 3"
    config = json.loads(query(one, "SELECT config FROM runs")[0][0])
    assert config["limits"]["rpm"] == 7


def test_metrics_report_requests_tokens_rate_limits_and_durations(market, emu):
    emu.script("rate_limit_minute", retry_delay="0s")
    emu.script("server_error", phase="skill")
    assert run(market, emu).exit_code == 0
    m = json.loads(overnight("metrics", market, "--json").stdout)
    sent = [r for r in emu.requests if r.method == "POST"]
    assert m["requests"] == len(sent) == 10
    assert m["rate_limited"] == 1 and m["plugins_done"] == 4
    assert m["retries"] == {"rate_limited_minute": 1, "server": 1}
    assert m["input_tokens"] == sum(r.prompt_tokens for r in sent if r.status == 200)
    assert m["output_tokens"] > 0 and 0 < m["success_rate"] < 1
    assert m["phases"]["plan"]["answers"] == 4 and m["phases"]["skill"]["p95_s"] is not None
    assert m["run"]["estimate"]["requests"] == 8 and m["run"]["actual"]["requests"] == 10
    (started, ended), = query(market, "SELECT started_at, ended_at FROM runs")
    assert m["run"]["actual"]["elapsed_s"] == round(_unix(ended) - _unix(started))  # wall time
    human = overnight("metrics", market)
    assert human.exit_code == 0 and "requests 10 (1 rate-limited" in human.stdout
    assert ", wall time " in human.stdout


def _unix(at: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(at).timestamp()


def test_metrics_give_a_paused_run_its_wall_time_until_the_pause(one, emu):
    """One request sent: there is no span between requests, but the run took time."""
    assert run(one, emu, "--rpd", "1", "--no-wait").exit_code == 0
    (started, paused), = query(one, "SELECT r.started_at, e.at FROM runs r JOIN events e ON e.type = 'RunPaused'")
    m = json.loads(overnight("metrics", one, "--json").stdout)["run"]
    assert (m["status"], m["actual"]["requests"]) == ("paused", 1)
    assert m["actual"]["elapsed_s"] == round(_unix(paused) - _unix(started))


def test_estimate_counts_plugins_requests_tokens_days_and_cost(market, emu, monkeypatch):
    """The next Pacific midnight is made one hour away; days are 24 hours after it."""
    from statemachine import metrics

    first = time.time() + 3600
    monkeypatch.setattr(metrics, "next_day_start", lambda t: first + 86400 * max(0, (t - first) // 86400 + 1))
    monkeypatch.setattr(metrics, "day_start", lambda t: metrics.next_day_start(t) - 86400)
    e = json.loads(overnight("estimate", market, "--json", "--rpd", "3", "--rpm", "10").stdout)
    assert (e["plugins"], e["requests"], e["used_today"]) == (4, 8, 0)
    # 3 before midnight, 3 the next day, the last 2 at 10 a minute (2 plugins at 10 s an answer
    # would allow 12) after the second midnight
    assert e["days"] == 2 and e["seconds"] == pytest.approx(3600 + 86400 + 12, abs=10)
    assert e["input_tokens"] > 0 and e["cost_usd"] > 0 and e["basis"].startswith("defaults")
    assert e["latency_s"] == 10
    assert run(market, emu, "--plugin", "meeting-notes").exit_code == 0
    after = json.loads(overnight("estimate", market, "--json").stdout)
    assert (after["plugins"], after["requests"], after["used_today"]) == (3, 6, 2)
    assert after["basis"].startswith("measured averages from 2 answers (")
    measured = query(market, "SELECT avg(settled_at - sent_at) FROM quota_ledger WHERE outcome = 'ok'")[0][0]
    assert after["latency_s"] == round(measured, 3) < 10
    # 2 of today's 3 are spent: 1 more today, 3 tomorrow, 2 the day after
    spent = json.loads(overnight("estimate", market, "--json", "--rpd", "3", "--rpm", "10").stdout)
    assert spent["days"] == 2 and spent["seconds"] == pytest.approx(3600 + 86400 + 12, abs=10)
    human = overnight("estimate", market, "--rpd", "3")
    assert human.exit_code == 0 and "(2 daily resets); 2 of today's 3 already used" in human.stdout
    # the limits take the same values as run's
    too_many = overnight("estimate", market, "--concurrency", "65")
    assert too_many.exit_code == 2 and "'--concurrency': 65 is not in the range 1<=x<=64" in too_many.stderr


def test_an_estimate_that_goes_on_through_midnight_waits_for_no_daily_reset(market, monkeypatch):
    """8 requests at 6 a minute, midnight 30 s away, 1,000,000 a day: "1m 20s (1 daily reset)"."""
    from statemachine import metrics

    first = time.time() + 30
    monkeypatch.setattr(metrics, "next_day_start", lambda t: first + 86400 * max(0, (t - first) // 86400 + 1))
    monkeypatch.setattr(metrics, "day_start", lambda t: metrics.next_day_start(t) - 86400)
    e = json.loads(overnight("estimate", market, "--json", "--rpd", "1000000", "--concurrency", "1").stdout)
    assert (e["requests"], e["days"]) == (8, 0) and e["seconds"] == pytest.approx(80, abs=2), e
    human = overnight("estimate", market, "--rpd", "1000000", "--concurrency", "1")
    assert "daily reset" not in human.stdout, human.stdout


def test_a_config_file_sets_defaults_flags_win_and_a_changed_file_is_recorded_on_resume(market, emu, tmp_path):
    config = tmp_path / "overnight.toml"
    config.write_text('max-requests = 2\nconcurrency = 1\nrpm = 500\n')
    first = run(market, emu, "--config", config, "--json")
    assert json.loads(first.stdout)["outcome"] == "budget_exhausted"
    recorded = json.loads(query(market, "SELECT config FROM runs")[0][0])
    assert recorded["budgets"]["max_requests"] == 2 and recorded["limits"]["concurrency"] == 1
    assert recorded["limits"]["rpm"] == 1000  # the flag (FAST) won over the file
    config.write_text('max_requests = 50\n')
    resumed = overnight("resume", market, "--config", config, "--json")
    assert json.loads(resumed.stdout)["outcome"] == "complete"
    reason = query(market, "SELECT json_extract(data, '$.reason') FROM events WHERE type = 'LimitsChanged'")
    assert reason == [("resume with --max-requests 50 (from the config file)",)]
    typo = tmp_path / "typo.toml"
    typo.write_text("rmp = 3\n")
    bad = overnight("estimate", market, "--config", typo)
    assert bad.exit_code == 2 and "unknown setting(s) rmp" in bad.stderr


def test_relative_paths_in_a_config_file_are_taken_from_its_directory(one, emu, tmp_path, monkeypatch):
    """`standards = "std.md"` beside the file was looked for in the current directory: a shared
    file (OVERNIGHT_CONFIG) worked from one directory only."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "std.md").write_text("Write for on-call engineers.\n", encoding="utf-8")
    (shared / "overnight.toml").write_text('standards = "std.md"\nbackup_to = "file:offsite.db"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run(one, emu, "--config", shared / "overnight.toml", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads(query(one, "SELECT config FROM runs")[0][0])
    assert config["standards_sha256"] == hashlib.sha256(b"Write for on-call engineers.\n").hexdigest()
    assert config["backup_to"] == f"file://{shared / 'offsite.db'}" and (shared / "offsite.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_a_broken_config_file_is_wrong_usage_told_in_one_line(one, emu, tmp_path):
    config = tmp_path / "overnight.toml"
    cases = {
        "rmp = 3\n": f"error: config file {config}: unknown setting(s) rmp; known: backoff, ",
        "rpm = \n": f"error: config file {config} is not valid TOML: ",
        'rpm = "fast"\n': f"error: config file {config}: rpm must be a whole number >= 1, not 'fast'",
        "concurrency = 0\n": f"error: config file {config}: concurrency must be a whole number >= 1",
    }
    for text, start in cases.items():
        config.write_text(text)
        for command in (["run", "--base-url", emu.url], ["estimate"]):
            result = overnight(*command, one, "--config", config)
            assert result.exit_code == 2, (text, result.output)
            assert result.stderr.startswith(start) and len(result.stderr.splitlines()) == 1, result.stderr
    assert emu.requests == [] and not (one / ".overnight").exists()


def test_a_minimum_size_above_the_maximum_is_refused_before_anything_happens(one, emu, tmp_path):
    result = run(one, emu, "--min-bytes", "20000", "--max-bytes", "100")
    assert result.exit_code == 2
    assert result.output == ("error: --min-bytes 20000 is more than --max-bytes 100: "
                             "no SKILL.md could pass the size gate\n")
    config = tmp_path / "overnight.toml"
    config.write_text("min_bytes = 9000\n")
    from_file = run(one, emu, "--config", config, "--max-bytes", "8500")
    assert from_file.exit_code == 2
    assert from_file.stderr.startswith(
        "error: --min-bytes 9000 (from the config file) is more than --max-bytes 8500: ")
    assert emu.requests == [] and not (one / ".overnight").exists()


@pytest.fixture
def tokyo(monkeypatch):
    """Local time in Asia/Tokyo (UTC+9, no daylight saving time) for this process."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield ZoneInfo("Asia/Tokyo")
    monkeypatch.undo()
    time.tzset()


def test_a_quota_pause_is_told_on_stderr_when_it_begins_and_when_it_ends(one, emu, tokyo, monkeypatch):
    """Without a terminal (cron, nohup) the progress lines say that a run waits for the quota,
    until when, and that it goes on; once each. The Pacific midnight is made 1 s away."""
    monkeypatch.setattr(scheduler, "next_day_start", lambda now: now + 1.0)
    emu.script("rate_limit_day", retry_delay="0s", phase="skill")
    result = run(one, emu)
    assert result.exit_code == 0, result.output
    until = query(one, "SELECT json_extract(data, '$.until') FROM events WHERE type = 'RunPaused'")[0][0]
    local = datetime.fromisoformat(until).astimezone(tokyo).strftime("%Y-%m-%d %H:%M JST")
    lines = progress_lines(result)
    assert lines[1:3] == [f"paused for the quota until {until} ({local} local time)", "quota pause over: going on"]
    assert len(lines) == 4
    assert lines[0].startswith("0/1 plugin  ")
    assert lines[3].startswith("1/1  done      plugins/tools/widget  (3 requests  ") and "1 rate-limited" in lines[3]


def test_the_eta_counts_the_time_the_per_minute_quota_takes(market, emu):
    """The first plugin is done in a fraction of a second, well inside the minute's quota; its
    pace alone promised the other five in a second or two. At 4 requests a minute their ten
    requests take about two and a half minutes."""
    from tests.marketplace_builder import plugin

    for n in (1, 2):
        plugin(market, f"plugins/tools/extra-{n}", f"extra-{n}", description=f"Extra plugin {n}.",
               files={"README.md": f"# Extra {n}\n\nDoes extra thing {n}.\n"})
    result = run(market, emu, "--rpm", "4", "--concurrency", "1", "--max-requests", "3")
    assert result.exit_code == 0, result.output
    first = next(line for line in result.stderr.splitlines() if line.startswith("1/6  done  "))
    minutes, seconds = map(int, re.search(r"  ETA (\d+)m (\d+)s\)$", first).groups())
    assert 120 <= minutes * 60 + seconds <= 151, first


def _eta(result, done: str) -> int:
    line = next(line for line in result.stderr.splitlines() if line.startswith(f"{done}  done  "))
    minutes, seconds = re.search(r"  ETA (?:(\d+)m )?(\d+)s\)$", line).groups()
    return int(minutes or 0) * 60 + int(seconds)


def test_the_eta_is_neither_a_minute_late_nor_a_minute_early(market, emu):
    """The quota's share of the ETA counted whole minutes from now, as if no request had been
    sent in this one: 36 s for the 6 requests that this minute still had room for, and 20 s for
    the last plugin's 2 requests when the minute's 6 were spent and free again only in a minute."""
    early = run(market, emu, "--rpm", "10", "--concurrency", "1")
    assert early.exit_code == 0, early.output
    assert early.stderr.splitlines()[-1].endswith(" rate-limited)"), early.stderr  # nothing left: no ETA
    assert _eta(early, "1/4") <= 10, early.stderr
    again = run(market, emu, "--rpm", "6", "--concurrency", "1", "--max-requests", "6", "--force")
    assert again.exit_code == 0, again.output
    assert 50 <= _eta(again, "3/4") <= 61, again.stderr


def test_the_first_progress_line_gives_the_eta_already(market, emu):
    """No ETA was shown until a plugin finished: at a low quota, the first quarter of an hour
    of a night's run. The answer time is the earlier runs' until this run measures its own."""
    assert run(market, emu, "--plugin", "meeting-notes").exit_code == 0  # 2 requests, this minute
    result = run(market, emu, "--rpm", "6", "--concurrency", "1", "--max-requests", "4")
    assert result.exit_code == 0, result.output
    first = progress_lines(result)[0]
    assert first.startswith("0/3 plugins  "), result.stderr
    minutes, seconds = re.search(r"  ETA (?:(\d+)m )?(\d+)s$", first).groups()
    # 6 requests: 4 go now, the last 2 when the first run's 2 leave the minute's window
    assert 50 <= int(minutes or 0) * 60 + int(seconds) <= 61, first


def test_the_eta_counts_whole_requests_a_minute_under_the_tokens_per_minute(tmp_path, emu):
    """A request goes only while the minute's tokens leave room for its whole estimate: at
    2,000 tokens a minute, requests of about 1,400 go one a minute. The ETA took Gemini's lower
    token counts and a fraction of a request a minute: the last plugin's two requests in about
    a minute, where they take two."""
    from tests.marketplace_builder import plugin

    root = tmp_path / "two"
    for n in range(2):
        plugin(root, f"plugins/tools/tool-{n}", f"tool-{n}", description=f"Tool {n}.",
               files={"README.md": f"# Tool {n}\n\nDoes thing {n}.\n" + "More detail here. " * 40})
    result = run(root, emu, "--tpm", "2000", "--rpm", "100", "--concurrency", "1", "--max-requests", "2")
    assert result.exit_code == 0, result.output
    assert _eta(result, "1/2") >= 110, result.stderr  # the skill request went at 60 s: then 120 s, 180 s
    # before any request, from the estimate the run began with: 4 requests, one a minute
    first = progress_lines(result)[0]
    minutes, seconds = re.search(r"  ETA (?:(\d+)m )?(\d+)s$", first).groups()
    assert int(minutes or 0) * 60 + int(seconds) >= 170, first


def test_the_eta_counts_the_tokens_a_request_holds_in_the_minute_as_the_scheduler_does(market, emu):
    """The scheduler settles a request at Gemini's count; the ETA paced the tokens per minute by
    the estimates (some 15% higher), and said a minute was left while the last requests went."""
    from statemachine.metrics import tokens_each
    from statemachine.workspace import open_log

    assert run(market, emu).exit_code == 0
    with open_log(market, writer=False) as store:
        (run_id, counted, estimated), = store.query(
            "SELECT run_id, avg(input_tokens), avg(est_input_tokens) FROM quota_ledger GROUP BY run_id")
        assert counted < estimated  # the emulator counts as Gemini does, below overnight's estimate
        assert tokens_each(store, run_id) == pytest.approx(counted)


def test_the_eta_after_a_wait_for_the_minute_counts_no_wait_that_is_over(tmp_path):
    """The pace since the run began counted the minute spent waiting for the quota: with the
    window open again and one plugin left, it said 10 s for what took none."""
    from tests.marketplace_builder import plugin

    root = tmp_path / "seven"
    for n in range(7):
        plugin(root, f"plugins/tools/tool-{n}", f"tool-{n}", description=f"Tool {n}.",
               files={"README.md": f"# Tool {n}\n\nDoes thing {n}.\n"})
    # answers take a while: the last two plugins finish apart, each on a progress line of its own
    with Emulator(api_key=KEY, latency=(0.3, 0.3), seed=7) as slow:
        result = run(root, slow, "--rpm", "10", "--concurrency", "1")  # five plugins, a minute's wait, two more
    assert result.exit_code == 0, result.output
    assert _eta(result, "6/7") <= 3, result.stderr


def test_the_summary_and_status_give_the_end_of_a_pause_in_local_time_too(one, emu, tokyo):
    emu.script("rate_limit_day", retry_delay=None, phase="skill")
    result = run(one, emu, "--no-wait")
    until = query(one, "SELECT json_extract(data, '$.until') FROM events WHERE type = 'RunPaused'")[0][0]
    local = datetime.fromisoformat(until).astimezone(tokyo).strftime("%Y-%m-%d %H:%M JST")
    assert f"daily quota used up: resume after {until} ({local} local time) with `" in result.stdout, result.stdout
    assert f"; paused until {until} ({local} local time); " in overnight("status", one).stdout


def test_estimate_names_the_plugins_with_a_prompt_larger_than_the_tokens_per_minute(market, emu):
    """A run fails such a plugin before sending anything; the estimate gave it requests, tokens
    and minutes."""
    assert json.loads(overnight("estimate", market, "--json").stdout)["unsendable"] == []
    result = json.loads(overnight("estimate", market, "--json", "--plugin", "deploy-checker", "--tpm", "100").stdout)
    assert (result["plugins"], result["requests"], result["input_tokens"]) == (0, 0, 0), result
    [(plugin_id, tokens)] = [(u["plugin"], u["tokens"]) for u in result["unsendable"]]
    assert plugin_id == "plugins/devops/deploy-checker" and tokens > 100
    text = overnight("estimate", market, "--plugin", "deploy-checker", "--tpm", "100").stdout
    assert (f"  cannot be sent: plugins/devops/deploy-checker: a prompt of it is about {tokens:,} tokens, more than "
            "the 100 tokens per minute allowed (if your quota allows more, state it with --tpm)\n") in text
    # just below its skill prompt (with no plan in it yet), above its plan prompt: the plan would
    # be sent, and the skill never; the estimate counted both
    between = json.loads(overnight("estimate", market, "--json", "--plugin", "deploy-checker", "--tpm",
                                   str(tokens - 1)).stdout)
    assert [u["tokens"] for u in between["unsendable"]] == [tokens], between
    sent = run(market, emu, "--plugin", "deploy-checker", "--tpm", "100")
    assert "tokens, more than the 100 tokens per minute allowed: it can never be sent" in sent.stdout, sent.stdout
    assert len([r for r in emu.requests if r.method == "POST"]) == 0
    # as estimate says, a run asks for no plan whose skill prompt could never be sent
    sent = run(market, emu, "--retry", "failed", "--plugin", "deploy-checker", "--tpm", str(tokens - 1))
    assert (f"its skill prompt is about {tokens:,} tokens even before the plan is added to it, more than the "
            f"{tokens - 1:,} tokens per minute allowed: it can never be sent") in sent.stdout, sent.stdout
    assert len([r for r in emu.requests if r.method == "POST"]) == 0


def test_estimate_builds_the_prompts_of_the_standards_and_model_a_run_would_use(market, emu, tmp_path):
    """`standards` and `model` in a config file (or as flags) were run's only: estimate built
    its prompts with the shipped standards, so a run's unsendable plugins went unnamed, and it
    counted another model's requests today. A standards file that is not UTF-8 stopped the run
    with an internal error (exit 4) after it had made the log."""
    big = tmp_path / "standards.md"
    big.write_text("Write clear skills.\n" * 100_000, encoding="utf-8")
    config = tmp_path / "overnight.toml"
    config.write_text(f'standards = "{big}"\nmodel = "gemini-2.5-pro"\n', encoding="utf-8")
    assert run(market, emu, "--plugin", "deploy-checker").exit_code == 0  # one flash request sent today
    plain = json.loads(overnight("estimate", market, "--json").stdout)
    configured = json.loads(overnight("estimate", market, "--json", "--config", config).stdout)
    assert plain["unsendable"] == [] and plain["used_today"] == len([r for r in emu.requests if r.method == "POST"])
    assert len(configured["unsendable"]) == 3 and configured["used_today"] == 0, configured
    flagged = json.loads(overnight("estimate", market, "--json", "--standards", big).stdout)
    assert flagged["unsendable"] == configured["unsendable"]
    garbled = tmp_path / "latin1.md"
    garbled.write_bytes("Qualit\xe9 first.\n".encode("latin-1"))
    fresh = tmp_path / "fresh"
    shutil.copytree(market, fresh, ignore=shutil.ignore_patterns(".overnight"))
    for command in ("run", "estimate"):
        refused = overnight(command, fresh, "--standards", garbled)
        assert refused.exit_code == 2, refused.output
        assert (f"Invalid value for '--standards': '{garbled}' is not UTF-8 text (byte 6 cannot be read as such)"
                in refused.stderr), refused.stderr
    assert not (fresh / ".overnight").exists()


def test_estimate_counts_a_plan_still_owed_and_takes_no_429_for_a_retry_rate(one, emu):
    emu.script("rate_limit_day", retry_delay=None, phase="plan")
    assert run(one, emu, "--no-wait").exit_code == 0
    assert query(one, "SELECT state, step FROM plugins") == [("retrying", "plan")]
    owed = json.loads(overnight("estimate", one, "--json").stdout)
    assert owed["requests"] == 2, owed  # the plan it still owes, and the SKILL.md
    emu.script("rate_limit_minute", retry_delay="0s", phase="skill")
    assert overnight("resume", one, "--rpd", "1000").exit_code == 0
    assert query(one, "SELECT outcome, count(*) FROM quota_ledger GROUP BY outcome") == [("ok", 2),
                                                                                          ("rate_limited", 2)]
    again = json.loads(overnight("estimate", one, "--force", "--json").stdout)
    assert again["requests"] == 2, again  # two 429s in four requests are the quota's, not Gemini's failures


def test_estimate_takes_no_connection_failure_for_a_retry_rate(one, emu):
    """Connections that failed (the network, the endpoint) say nothing of Gemini's answers: a
    run that got through after four resets made every later request count three times."""
    emu.script("reset", times=4, phase="plan")
    assert run(one, emu, "--backoff", "0").exit_code == 0
    assert query(one, "SELECT outcome, count(*) FROM quota_ledger GROUP BY outcome") == [("connection", 4),
                                                                                          ("ok", 2)]
    again = json.loads(overnight("estimate", one, "--force", "--json").stdout)
    assert again["requests"] == 2, again


def test_estimate_asks_nothing_for_a_plugin_found_as_overnight_left_it(one, emu):
    """Another branch checked out and back: every plugin is found again with the files overnight
    left, and a run does them again with no request; estimate counted two requests each."""
    assert run(one, emu).exit_code == 0
    readme = one / "plugins/tools/widget/README.md"
    kept = readme.read_text()
    readme.write_text(kept + "\nOn another branch.\n")
    overnight("scan", one)
    readme.write_text(kept)
    again = json.loads(overnight("estimate", one, "--json").stdout)
    assert (again["plugins"], again["as_left"], again["requests"]) == (1, 1, 0), again
    assert "1 plugin to process (1 found as overnight left them: done again with no request): 0 requests" in (
        overnight("estimate", one).stdout)
    assert json.loads(overnight("estimate", one, "--force", "--json").stdout)["requests"] == 2
    asked = [r for r in emu.requests if r.method == "POST"]
    assert run(one, emu).exit_code == 0 and [r for r in emu.requests if r.method == "POST"] == asked
    assert query(one, "SELECT state FROM plugins") == [("done",)]


def test_estimate_takes_no_refused_request_for_a_retry_rate(one, emu):
    """A 400 fails its plugin at once, never retried: counted as a retry Gemini's answers need,
    it made `estimate --retry failed` after such a night cost some 60% more than the run did."""
    emu.script("bad_request", phase="skill")
    assert run(one, emu).exit_code == 1
    assert query(one, "SELECT outcome, count(*) FROM quota_ledger GROUP BY outcome") == [("ok", 1), ("refused", 1)]
    again = json.loads(overnight("estimate", one, "--retry", "failed", "--json").stdout)
    assert again["requests"] == 1, again  # the SKILL.md's, once (its plan is used again)


def test_retry_failed_uses_again_the_plan_of_a_plugin_whose_skill_step_failed(one, emu, tmp_path):
    """Each plugin `--retry failed` took up asked for a new plan, though the one its last pass
    received would be asked for with the very same prompt: one request more each, of a free
    tier's 20 a day."""
    emu.script("bad_request", phase="skill")
    assert run(one, emu).exit_code == 1
    assert json.loads(overnight("estimate", one, "--retry", "failed", "--json").stdout)["requests"] == 1
    other = tmp_path / "standards.md"
    other.write_text("Other standards.\n", encoding="utf-8")
    assert json.loads(overnight("estimate", one, "--retry", "failed", "--standards", other,
                                "--json").stdout)["requests"] == 2  # another prompt: a new plan
    before = [r.phase for r in emu.requests if r.method == "POST"]
    emu.script("bad_request", phase="skill")  # failed at the skill step again, after its plan used again
    assert run(one, emu, "--retry", "failed").exit_code == 1
    assert run(one, emu, "--retry", "failed").exit_code == 0  # the same plan serves once more
    assert [r.phase for r in emu.requests if r.method == "POST"][len(before):] == ["skill", "skill"]
    assert query(one, "SELECT state FROM plugins") == [("done",)]
    (plan_id,), = query(one, "SELECT json_extract(data, '$.request_id') FROM events WHERE type = 'PlanReceived'")
    assert query(one, "SELECT json_extract(data, '$.request_id') FROM events WHERE type = 'PlanReused'") == [
        (plan_id,), (plan_id,)]
    # failed again at the skill step, then retried with other standards: the plan is asked for anew
    emu.script("bad_request", phase="skill")
    assert run(one, emu, "--force").exit_code == 1
    assert run(one, emu, "--retry", "failed", "--standards", other).exit_code == 0
    assert [r.phase for r in emu.requests if r.method == "POST"][-4:] == ["plan", "skill", "plan", "skill"]


def test_a_limit_restated_on_resume_wins_over_one_learned_since_the_run_began(one, emu):
    """`resume --rpm 30` on a run begun with --rpm 30 recorded nothing, so the rpm 5 a 429 had
    taught since still paced it, without a word."""
    emu.script("rate_limit_minute", retry_delay="0s", quota_value=5, phase="plan")
    emu.script("rate_limit_day", retry_delay=None, phase="skill")
    assert run(one, emu, "--rpm", "30", "--no-wait").exit_code == 0
    assert ("rpm", 5) in query(one, "SELECT metric, value FROM quota_limits")
    emu.script("rate_limit_day", retry_delay=None, phase="skill")  # still the day's end: it pauses again
    assert overnight("resume", one, "--rpm", "30").exit_code == 0
    (explicit, reason), = query(one, "SELECT json_extract(data, '$.explicit'), json_extract(data, '$.reason') "
                                     "FROM events WHERE type = 'LimitsChanged'")
    assert "rpm" in json.loads(explicit) and reason == "resume with --rpm 30"
    from statemachine.gateway import GeminiSettings
    from statemachine.scheduler import Limits, effective_limits
    from statemachine.workspace import open_log
    with open_log(one, writer=False) as store:  # what the resumed run paces by
        stated_at = store.query("SELECT max(at) FROM events WHERE type = 'LimitsChanged'")[0][0]
        assert effective_limits(store, GeminiSettings().model, Limits(rpm=30), ("rpm",), stated_at).rpm == 30


def test_counts_of_one_are_singular(one, emu):
    planned = run(one, emu, "--dry-run")
    assert planned.exit_code == 0, planned.output
    lines = progress_lines(planned)
    assert lines[0].startswith("0/1 plugin  0 requests  ")
    assert lines[-1].startswith("1/1  planned   plugins/tools/widget  (1 request  ")
    assert planned.stdout.startswith("run ") and "complete; 1 plugin selected (planned 1)" in planned.stdout
    assert overnight("status", one).stdout.startswith("1 plugin (planned 1); ")
    last_run = overnight("metrics", one).stdout.splitlines()[-1]
    assert last_run.startswith("last run ") and " finished, 1 request, wall time " in last_run
    assert re.search(r" \(estimated 1 request, \d+s\)$", last_run)  # a dry run sends the plan request only
    assert overnight("estimate", one).stdout.startswith("1 plugin to process: 1 request, ")  # the SKILL.md


def test_after_a_signal_the_summary_ends_with_the_command_that_resumes(tmp_path, one):
    log = tmp_path / "elsewhere.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    with Emulator(api_key=KEY, latency=(0.5, 0.6), seed=5) as slow:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(one), "--base-url", slow.url, *FAST,
                                 "--db", str(log)], cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not [r for r in slow.requests if r.method == "POST"]:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert out.splitlines()[-1] == f"`overnight resume {one.resolve()} --db {log}` continues this run"
        resumed = overnight("resume", one, "--db", log, "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["outcome"] == "complete"


def test_an_unfinished_older_run_counts_its_skipped_plugins_as_finished(market):
    """`older run ... is unfinished: interrupted, 0 done of 4 plugins` when three of the four
    had been skipped and one was left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    with Emulator(api_key=KEY, latency=(0.5, 0.6), seed=5) as slow:
        assert run(market, slow).exit_code == 0
        for readme in market.glob("plugins/*/*/README.md"):  # all four changed: the run takes them all
            readme.write_text(readme.read_text() + "\nA new section.\n")
            skill = next(readme.parent.glob("skills/*/SKILL.md"))
            if readme.parent.name != "deploy-checker":  # three a person edited: kept, skipped
                skill.write_text(skill.read_text() + "\nTeam note.\n")
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(market), "--base-url", slow.url, *FAST],
                                cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            posts = len([r for r in slow.requests if r.method == "POST"])
            deadline = time.monotonic() + 30
            while len([r for r in slow.requests if r.method == "POST"]) == posts:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        finally:
            proc.kill()
        (older,) = query(market, "SELECT run_id FROM runs WHERE status = 'interrupted'")[0]
        assert overnight("run", market, "--base-url", slow.url, *FAST, "--plugin", "meeting-notes", "--force",
                         key=KEY).exit_code == 0
    text = overnight("status", market).stdout
    assert f"older run {older} is unfinished: interrupted, 3 of 4 plugins finished; " in text, text


def test_without_a_terminal_each_finished_plugin_gets_a_line_naming_it_and_its_outcome(market, emu):
    """A log of a night's run (cron, nohup) tells which plugin ended how, a failure with its
    reason; a resume names only the plugins it finishes itself."""
    emu.script("bad_request", phase="plan", message="the request is malformed")
    first = run(market, emu, "--concurrency", "1", "--max-requests", "3")
    assert first.exit_code == 0, first.output  # a budget stop
    lines = progress_lines(first)
    assert lines[0].startswith("0/4 plugins  0 requests  ")
    named = [line for line in lines[1:] if re.match(r"\d/4  ", line)]
    assert len(named) == 2, first.stderr
    failed = next(line for line in named if "  failed    " in line)
    assert re.match(r"1/4  failed    plugins/\S+: .*the request is malformed  \(1 request  ", failed), failed
    done = next(line for line in named if "  done      " in line)
    assert re.match(r"2/4  done      plugins/\S+  \(3 requests  ", done), done  # the run's totals then
    resumed = overnight("resume", market, "--max-requests", "100")
    assert resumed.exit_code == 1, resumed.output  # complete but for the failed plugin
    assert progress_lines(resumed)[0].startswith("2/4 plugins  3 requests  ")
    again = [line for line in resumed.stderr.splitlines() if re.match(r"\d/4  ", line)]
    assert [line.split()[:2] for line in again] == [["3/4", "done"], ["4/4", "done"]], resumed.stderr
    named_plugins = {line.split()[2] for line in named + again}
    assert len(named_plugins) == 4, named_plugins


def test_after_resume_the_progress_lines_count_the_whole_runs_requests(market, emu):
    """A resumed run goes on counting from what it already sent, not from zero."""
    assert run(market, emu, "--max-requests", "3", "--concurrency", "1").exit_code == 0
    resumed = overnight("resume", market, "--max-requests", "100")
    assert resumed.exit_code == 0, resumed.output
    assert len([r for r in emu.requests if r.method == "POST"]) == 8
    assert re.match(r"4/4  done      plugins/\S+  \(8 requests  ", resumed.stderr.splitlines()[-1]), resumed.stderr


def _watch(args: list[str], until: list[str], timeout: float = 30.0) -> tuple[str, int]:
    """Run the CLI with its stderr on a pseudo-terminal (what a person watching sees) until
    every text of `until` has been shown, then stop it with SIGINT: (screen text, exit code)."""
    import fcntl
    import pty
    import struct
    import termios

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env={**env, "GOOGLE_API_KEY": KEY},
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    screen, deadline = "", time.monotonic() + timeout
    try:
        while not all(text in screen for text in until) and time.monotonic() < deadline and proc.poll() is None:
            try:
                screen += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", os.read(master, 65536).decode("utf-8", "replace"))
            except OSError:  # the child closed the terminal
                break
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
        os.close(master)
    assert all(text in screen for text in until), screen[-3000:]
    return screen, proc.returncode


def test_a_terminal_shows_which_quota_window_a_plugin_waits_for_and_the_plugins_waiting_to_retry(market, emu):
    screen, code = _watch(["run", str(market), "--base-url", emu.url, "--rpm", "1", "--concurrency", "2"],
                          until=["waits 1m 1s (requests per minute: 1)"])
    assert code == 130
    assert re.search(r"plugins/\S+  asking for a plan, waits 1m [01]s \(requests per minute: 1\)", screen)

    emu.script("rate_limit_minute", retry_delay="40s")
    again = market.parent / "again"
    shutil.copytree(market, again, ignore=shutil.ignore_patterns(".overnight"))
    screen, code = _watch(["run", str(again), "--base-url", emu.url, *FAST, "--concurrency", "2"],
                          until=["1 plugin waiting to retry, the first in 4", "(the retry delay of a 429)"])
    assert code == 130
    assert re.search(r"1 plugin waiting to retry, the first in 4[01]s", screen)
    # the plugin that did not get the 429 waits for its plan, or for its SKILL.md when its plan came first
    assert re.search(r"asking for a (plan|SKILL\.md), waits 4[01]s \(the retry delay of a 429\)", screen), screen


def test_a_terminal_shows_the_runs_scan_before_its_progress(one, emu):
    screen, _ = _watch(["run", str(one), "--base-url", emu.url, *FAST], until=["1/1 plugin  "])
    assert "scanning 0/1 plugin  plugins/tools/widget" in screen, screen
    assert screen.index("scanning 0/1 plugin") < screen.index("1/1 plugin  "), screen


def test_a_terminal_lists_the_last_plugins_finished_with_their_outcome(market, emu):
    emu.script("bad_request", phase="plan", message="the request is malformed")
    screen, _ = _watch(["run", str(market), "--base-url", emu.url, *FAST, "--concurrency", "1"],
                       until=["4/4  "])
    finished = set(re.findall(r"\d/4  (done|failed) +(plugins/[\w/-]+)", screen))
    assert len({plugin for _, plugin in finished}) == 4, screen
    assert [outcome for outcome, _ in finished].count("failed") == 1, screen


@pytest.mark.parametrize("stop", [["--max-requests", "3"], ["--rpd", "3", "--no-wait"]])
def test_a_budget_or_quota_stop_sends_no_more_requests_but_finishes_what_needs_none(market, stop):
    """Answers already received are gated and written: no plugin is left between a request and
    its write (generated, validated, snapshotted, writing), where it would wait for quota it
    does not need. Slow answers make the stop come while another plugin's answer is on its way."""
    with Emulator(api_key=KEY, latency=(0.3, 0.4), seed=3) as slow:
        result = overnight("run", market, "--base-url", slow.url, "--rpm", "1000", "--backoff", "0.05",
                           "--concurrency", "2", *stop)
        sent = len([r for r in slow.requests if r.method == "POST"])
    assert result.exit_code == 0, result.output
    assert sent == 3
    states = dict(query(market, "SELECT plugin_id, state FROM plugins"))
    assert set(states.values()) <= {"done", "analyzed", "planned"}, states
    assert "done" in states.values()
    # the progress lines name finished plugins only, not those the stop left waiting
    progress = [line for line in result.stderr.splitlines() if re.match(r"\d/4  ", line)]
    assert len(progress) == list(states.values()).count("done"), progress
    assert all(re.match(r"\d/4  done      plugins/\S+  \(\d requests  ", line) for line in progress), progress


def test_a_cost_budget_counts_at_the_prices_given_to_run(market, emu):
    """At the default prices one plan request costs less than $0.01; at $1,000 per million
    tokens not even the first one fits in it, and the run stops before sending any."""
    result = run(market, emu, "--concurrency", "1", "--max-cost", "0.01",
                 "--price-input", "1000", "--price-output", "1000", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "budget_exhausted"
    assert summary["message"] == "cost budget reached: 0 of 0.01; the next request could take it past that"
    assert [r for r in emu.requests if r.method == "POST"] == []
    config = json.loads(query(market, "SELECT config FROM runs")[0][0])
    assert config["prices"] == {"input_per_million": 1000.0, "output_per_million": 1000.0}


@pytest.mark.parametrize("budget", [["--max-tokens", "12000"], ["--max-cost", "0.0036", "--price-input", "0.3",
                                                                   "--price-output", "0.3"]])
def test_token_and_cost_budgets_hold_however_many_requests_are_under_way(market, budget):
    """Each request holds what it is expected to take until its answer comes: eight at once
    cannot all slip under a budget that only what was already spent is checked against."""
    with Emulator(api_key=KEY, latency=(0.3, 0.4), seed=3) as slow:
        result = overnight("run", market, "--base-url", slow.url, "--rpm", "1000", "--concurrency", "8",
                           *budget, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "budget_exhausted"
    ((tokens, requests, largest),) = query(
        market, "SELECT sum(input_tokens + output_tokens + coalesce(thoughts_tokens, 0)), count(*), "
                "max(est_input_tokens) FROM quota_ledger")
    assert requests >= 2 and tokens <= 12000  # $0.0036 at $0.30 per million tokens is 12,000 tokens
    # and it stopped only when the next request could not fit even once those under way had settled
    assert 12000 - tokens < largest + 3600  # its prompt and an answer of the size expected


def test_resume_wait_sleeps_through_a_pause_that_run_no_wait_left(one, emu, monkeypatch):
    monkeypatch.setattr(scheduler, "next_day_start", lambda now: now + 3.0)  # the pause ends 3 s later
    emu.script("rate_limit_day", retry_delay="0s", phase="skill")
    paused = run(one, emu, "--no-wait")
    assert paused.exit_code == 0 and f"or `overnight resume {one} --wait` now, to sleep until then" in paused.stdout
    resumed = overnight("resume", one, "--wait", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["outcome"] == "complete"
    assert "paused for the quota until " in resumed.stderr and "quota pause over: going on" in resumed.stderr


def test_estimate_names_the_unfinished_run_resume_would_continue_and_its_limits(market, emu):
    """During a --no-wait pause, estimate gave a new run's time at the default limits and said
    nothing of the paused run, whose own limits resume keeps."""
    assert run(market, emu, "--rpd", "3", "--rpm", "600", "--no-wait").exit_code == 0
    (run_id, until), = query(market, "SELECT run_id, paused_until FROM runs")
    text = overnight("estimate", market).stdout
    assert f"run {run_id} is unfinished (paused, paused until {until}" in text
    assert (f"`overnight resume {market}` continues it at its own limits (600 requests/min, 250,000 input "
            "tokens/min, 3/day); the figures above are a new run's, with these flags") in text
    unfinished = json.loads(overnight("estimate", market, "--json").stdout)["unfinished_run"]
    assert unfinished["run_id"] == run_id and unfinished["paused_until"] == until
    assert (unfinished["limits"]["rpd"], unfinished["limits"]["rpm"]) == (3, 600)


def test_status_tells_a_pause_whose_time_has_come(one, emu, monkeypatch):
    """Past the end of a --no-wait pause, status still said `resume --wait` sleeps until then."""
    monkeypatch.setattr(scheduler, "next_day_start", lambda now: now + 1.0)  # the pause ends a second later
    emu.script("rate_limit_day", retry_delay="0s", phase="skill")
    assert run(one, emu, "--no-wait").exit_code == 0
    (until,), = query(one, "SELECT paused_until FROM runs")
    time.sleep(max(0.0, datetime.fromisoformat(until).timestamp() - time.time()) + 0.1)
    text = overnight("status", one).stdout
    assert f"; that time has come: `overnight resume {one}` goes on" in text and "sleeps until then" not in text


def test_status_tells_a_paused_run_no_process_waits_for_from_one_a_process_sleeps_through(one, emu):
    from events.lock import WriterLock
    emu.script("rate_limit_day", retry_delay="0s", phase="skill")
    assert run(one, emu, "--no-wait").exit_code == 0  # or a run that waited, killed: nothing wakes up
    hint = f"; no overnight process is waiting for it: `overnight resume {one} --wait` sleeps until then and goes on"
    text = overnight("status", one).stdout
    assert "; paused until " in text and hint in text
    assert json.loads(overnight("status", one, "--json").stdout)["last_run"]["waiting"] is False
    lock = WriterLock(one / ".overnight" / "overnight.db")  # as the run sleeping out its pause holds it
    lock.acquire()
    try:
        assert hint not in overnight("status", one).stdout
        assert json.loads(overnight("status", one, "--json").stdout)["last_run"]["waiting"] is True
    finally:
        lock.release()


def test_dry_run_with_force_is_refused_before_anything_happens(market, emu):
    assert run(market, emu).exit_code == 0
    before = query(market, "SELECT count(*) FROM events")
    result = run(market, emu, "--dry-run", "--force")
    assert result.exit_code == 2 and result.output.startswith("error: --dry-run with --force would put finished ")
    assert query(market, "SELECT count(*) FROM events") == before


def test_a_paused_run_that_a_newer_run_finishes_is_finished_without_its_pause(one, emu):
    assert run(one, emu, "--rpd", "1", "--no-wait").exit_code == 0
    (paused, until), = query(one, "SELECT run_id, paused_until FROM runs WHERE status = 'paused'")
    assert until
    newer = run(one, emu, "--rpd", "100", "--json")
    assert newer.exit_code == 0 and json.loads(newer.stdout)["outcome"] == "complete"
    assert (json.loads(newer.stdout)["by_state"], json.loads(newer.stdout)["by_other_runs"]) == ({"done": 1}, {})
    assert query(one, "SELECT status, paused_until FROM runs WHERE run_id = ?", paused) == [("complete", None)]
    # the plugin is credited to the run that finished it, once
    assert query(one, "SELECT json_extract(data, '$.counts'), json_extract(data, '$.by_other_runs') FROM events "
                      "WHERE type = 'RunFinished' AND stream = ?", f"run:{paused}") == [("{}", '{"done":1}')]
    assert query(one, "SELECT run_id = ?, done FROM run_summary ORDER BY started_at", paused) == [(1, 0), (0, 1)]
    assert json.loads(overnight("status", one, "--json").stdout)["unfinished_runs"] == []


def test_a_budget_or_price_that_is_not_a_finite_number_is_refused(one, emu, tmp_path):
    """click's FloatRange lets nan through: a cost budget of nan would be no budget at all."""
    for flags in (["--max-cost", "nan"], ["--max-cost", "inf"], ["--price-input", "nan"]):
        refused = run(one, emu, *flags)
        assert refused.exit_code == 2 and "is not a finite number" in refused.stderr, flags
    config = tmp_path / "overnight.toml"
    config.write_text("max_cost = nan\n")
    refused = run(one, emu, "--config", config)
    assert refused.exit_code == 2 and f"config file {config}: max_cost must be a number >= 0, not nan" in refused.stderr
    assert not (one / ".overnight").exists()  # refused before anything was written
