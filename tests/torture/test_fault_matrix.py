"""Part 2: every emulator fault kind at every phase (plan, skill), on a one-plugin marketplace.

In-process through click's CliRunner (the real CLI, the real google-genai client over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from tests.emulator import FAULTS, Emulator
from tests.marketplace_builder import manifest, plugin
from tests.torture import FULL, KEY, bump, posts, query, record

ID = "plugins/tools/widget"
FAST = ["--rpm", "1000", "--rpd", "100000", "--backoff", "0.05", "--timeout", "1"]
TRANSIENT = {"server_error": "server", "unavailable": "server", "reset": "connection",
             "malformed_body": "invalid_answer", "invalid_json": "invalid_answer",
             "schema_mismatch": "invalid_answer", "blocked": "blocked", "max_tokens": "truncated",
             "safety": "safety", "recitation": "recitation", "empty": "empty", "timeout": "timeout"}
QUOTA = {"rate_limit_minute": "rate_limited_minute", "rate_limit_tokens": "rate_limited_tokens",
         "rate_limit_bare": "rate_limited"}


def overnight(*args):
    env = {"GOOGLE_API_KEY": KEY, "GEMINI_API_KEY": None, "GOOGLE_GENAI_USE_VERTEXAI": None,
           "GOOGLE_GEMINI_BASE_URL": None, "OVERNIGHT_DB": None, "OVERNIGHT_CONFIG": None}
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def one_plugin(root: Path) -> Path:
    manifest(root, [{"name": "widget", "source": "./" + ID, "category": "tools"}])
    plugin(root, ID, "widget", description="Build and check widgets.",
           files={"README.md": "# Widget\n\nBuilds widgets from specs and checks them.\n",
                  "commands/build.md": "# /build\n\nBuild a widget from a spec file.\n"})
    return root


def db(root: Path) -> Path:
    return root / ".overnight" / "overnight.db"


def healthy(root: Path) -> None:
    verify = overnight("audit", "verify", root, "--json")
    assert verify.exit_code == 0, verify.stdout
    assert overnight("audit", "replay", root).exit_code == 0
    assert not [p for p in root.rglob("*") if "overnight-tmp-" in p.name]
    for path in db(root).parent.iterdir():
        assert KEY.encode() not in path.read_bytes()


def params(kind: str) -> dict:
    if kind.startswith("rate_limit") and kind != "rate_limit_bare":
        return {"retry_delay": "1s"} if kind != "rate_limit_day" else {"retry_delay": None}
    if kind == "timeout":
        return {"delay": 2}
    return {}


def cases() -> list[tuple[str, tuple[str, ...]]]:
    """(kind, phases). Full: one run per kind and phase. Smoke: one run per kind with the fault
    at both phases (a fault that ends the run at the plan, day quota or 4xx, is run per phase)."""
    out = []
    for kind in FAULTS:
        if FULL or kind == "rate_limit_day" or (kind not in TRANSIENT and kind not in QUOTA and not kind.startswith("gate_")):
            out += [(kind, ("plan",)), (kind, ("skill",))]
        else:
            out.append((kind, ("plan", "skill")))
    return out


@pytest.mark.parametrize("kind, phases", cases(), ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_fault_once(tmp_path, kind, phases):
    root = one_plugin(tmp_path / "m")
    with Emulator(api_key=KEY, seed=3) as emu:
        for phase in phases:
            emu.script(kind, phase=phase, **params(kind))
        extra = ["--no-wait", "--json"] if kind == "rate_limit_day" else ["--json"]
        result = overnight("run", root, "--base-url", emu.url, *FAST, *extra)
        sent = posts(emu)
    state = query(db(root), "SELECT state FROM plugins")[0][0]
    failures = query(db(root), "SELECT json_extract(data, '$.kind'), json_extract(data, '$.step') "
                               "FROM events WHERE type = 'RequestFailed' ORDER BY seq")
    gates = query(db(root), "SELECT count(*) FROM events WHERE type = 'SkillGateFailed'")[0][0]
    if kind == "rate_limit_day":
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["outcome"] == "paused" and summary["paused_until"]
        assert state == "retrying"
        outcome = "paused until the Pacific midnight (--no-wait), plugin retrying"
    elif kind.startswith("gate_"):
        assert result.exit_code == 0, result.output
        assert state == "done"
        skill = "skill" in phases
        assert gates == int(skill) and len(sent) == 2 + int(skill)  # gate faults apply to SKILL.md only
        outcome = "plan: no effect (emulator); skill: regenerated with the reasons; done"
    elif kind == "untidy_files":  # CRLF, a byte order mark, no final newline: written tidy
        assert result.exit_code == 0, result.output
        assert state == "done" and failures == [] and len(sent) == 2
        outcome = "plan: no effect (emulator); skill: written with LF, no BOM, one final newline; done"
    elif kind not in TRANSIENT and kind not in QUOTA:  # other 4xx (bad_request): fail at once
        assert result.exit_code == 1, result.output
        assert state == "failed" and len(sent) == (1 if phases == ("plan",) else 2)
        reason = query(db(root), "SELECT reason FROM plugins")[0][0]
        assert reason and "\n" not in reason and "400" in reason, reason
        outcome = f"failed at once: {reason}"
    else:
        assert result.exit_code == 0, result.output
        assert state == "done"
        expected = TRANSIENT.get(kind) or QUOTA[kind]
        assert failures == [(expected, phase) for phase in phases], failures
        assert len(sent) == 2 + len(phases)
        outcome = f"retried ({expected}), done"
    healthy(root)
    for phase in phases:
        bump("fault_matrix", "kind x phase cases")
        record("fault_matrix", **{f"{kind} @ {phase}": outcome})
    bump("fault_matrix", "runs")


PERSISTENT = [k for k in FAULTS if k in TRANSIENT or k.startswith("gate_")] if FULL else ["server_error", "gate_voice"]


@pytest.mark.parametrize("kind", PERSISTENT)
def test_fault_every_time_ends_the_plugin_with_the_reason(tmp_path, kind):
    root = one_plugin(tmp_path / "m")
    phase = "skill"
    with Emulator(api_key=KEY, seed=3) as emu:
        emu.script(kind, times=2, phase=phase, **params(kind))
        result = overnight("run", root, "--base-url", emu.url, *FAST, "--max-attempts", "2", "--gate-attempts", "2")
    state, reason = query(db(root), "SELECT state, reason FROM plugins")[0]
    if kind.startswith("gate_"):
        assert result.exit_code == 0 and state == "rejected", (result.output, state)
    else:
        assert result.exit_code == 1 and state == "failed", (result.output, state)
        assert f"skill failed 2 times; last: {TRANSIENT[kind]}" in result.stdout
    assert reason and "\n" not in reason
    assert not (root / ID / "skills").exists()
    healthy(root)
    bump("fault_matrix", "persistent_cases")
