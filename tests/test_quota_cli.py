"""Budgets, limit changes on resume, `overnight metrics` and `overnight estimate`, end to end."""

from __future__ import annotations

import json

from tests.test_run import FAST, emu, market, one, overnight, query, run  # noqa: F401 (fixtures)


def test_a_request_budget_stops_cleanly_and_resume_with_a_larger_one_finishes(market, emu):
    stopped = run(market, emu, "--max-requests", "3", "--concurrency", "1", "--json")
    assert stopped.exit_code == 0, stopped.output
    summary = json.loads(stopped.stdout)
    assert summary["outcome"] == "budget_exhausted" and "requests budget reached" in summary["message"]
    assert len([r for r in emu.requests if r.method == "POST"]) == 3
    assert query(market, "SELECT json_extract(data, '$.budget'), json_extract(data, '$.used') "
                         "FROM events WHERE type = 'BudgetExhausted'") == [("requests", 3.0)]
    assert query(market, "SELECT status FROM runs") == [("budget_exhausted",)]
    again = overnight("resume", market, "--max-requests", "2")
    assert again.exit_code == 0 and "budget reached" in again.stdout  # 3 spent already: nothing sent
    assert len([r for r in emu.requests if r.method == "POST"]) == 3
    finished = overnight("resume", market, "--max-requests", "100", "--json")
    assert finished.exit_code == 0, finished.output
    assert json.loads(finished.stdout)["outcome"] == "complete"
    assert len([r for r in emu.requests if r.method == "POST"]) == 8
    changes = query(market, "SELECT json_extract(data, '$.reason'), json_extract(data, '$.budgets.max_requests') "
                            "FROM events WHERE type = 'LimitsChanged' ORDER BY seq")
    assert changes == [("resume with --max-requests 2", 2), ("resume with --max-requests 100", 100)]


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
    human = overnight("metrics", market)
    assert human.exit_code == 0 and "requests 10 (1 rate-limited" in human.stdout


def test_estimate_counts_plugins_requests_tokens_days_and_cost(market, emu):
    e = json.loads(overnight("estimate", market, "--json", "--rpd", "3", "--rpm", "10").stdout)
    assert (e["plugins"], e["requests"]) == (4, 8)
    assert e["days"] == 2 and e["seconds"] >= 2 * 86400  # 8 requests at 3 a day: two resets
    assert e["input_tokens"] > 0 and e["cost_usd"] > 0 and e["basis"].startswith("defaults")
    assert run(market, emu, "--plugin", "meeting-notes").exit_code == 0
    after = json.loads(overnight("estimate", market, "--json").stdout)
    assert (after["plugins"], after["requests"]) == (3, 6)
    assert after["basis"].startswith("measured averages from 2 answers")
    human = overnight("estimate", market, "--rpd", "3")
    assert human.exit_code == 0 and "daily resets" in human.stdout


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
    assert bad.exit_code == 1 and "unknown setting(s) rmp" in bad.stderr
