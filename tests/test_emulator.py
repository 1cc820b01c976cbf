"""The Gemini emulator, exercised through the real google-genai client over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import httpx2
import msgspec
import pytest
from google import genai
from google.genai import errors, types

from statemachine.catalog import Plan, SkillDraft
from tests import skill_content as sc
from tests.emulator import FAULTS, PACIFIC, Emulator, conform, name_hint, phase_of

PLAN_SCHEMA = msgspec.json.schema(Plan)
SKILL_SCHEMA = msgspec.json.schema(SkillDraft)
MODEL = "gemini-2.5-flash"
ROOT = Path(__file__).resolve().parent.parent


def make_client(emu: Emulator, key: str = "test-key", timeout_ms: int = 5000) -> genai.Client:
    return genai.Client(api_key=key, vertexai=False,
                        http_options=types.HttpOptions(base_url=emu.url, api_version="v1beta",
                                                       timeout=timeout_ms))


def config(schema: dict | None = PLAN_SCHEMA, max_tokens: int = 8192) -> types.GenerateContentConfig:
    if schema is None:
        return types.GenerateContentConfig(max_output_tokens=max_tokens)
    return types.GenerateContentConfig(response_mime_type="application/json",
                                       response_json_schema=schema, max_output_tokens=max_tokens)


def plan_call(client: genai.Client, contents: str = "Plugin: demo-tool\nPlan it.",
              model: str = MODEL) -> types.GenerateContentResponse:
    return client.models.generate_content(model=model, contents=contents, config=config())


def skill_call(client: genai.Client, contents: str = "Plugin: demo-tool\nWrite the skill.",
               max_tokens: int = 8192) -> types.GenerateContentResponse:
    return client.models.generate_content(model=MODEL, contents=contents,
                                          config=config(SKILL_SCHEMA, max_tokens))


@pytest.fixture(scope="module")
def _shared():
    # One server and one client for the module: building a genai.Client costs ~0.2 s.
    with Emulator(api_key="test-key") as e:
        yield e, make_client(e)


@pytest.fixture
def emu(_shared):
    e = _shared[0]
    e.clear()
    yield e
    e.clear()


@pytest.fixture
def client(_shared):
    return _shared[1]


def error_details(exc: errors.APIError) -> list[dict]:
    return exc.details["error"].get("details", [])


def detail(exc: errors.APIError, type_suffix: str) -> dict | None:
    return next((d for d in error_details(exc) if d["@type"].endswith(type_suffix)), None)


# ------------------------------------------------------------------- normal answers


def test_plan_answer_conforms_and_reports_usage(emu, client):
    resp = client.models.generate_content(
        model=MODEL, contents="Plugin: demo-tool\nPlan the enhancement.",
        config=types.GenerateContentConfig(response_mime_type="application/json",
                                           response_json_schema=PLAN_SCHEMA,
                                           system_instruction="Act as a reviewer.",
                                           max_output_tokens=8192))
    plan = msgspec.json.decode(resp.text, type=Plan)
    assert plan.gaps and 0 <= plan.quality_before <= plan.quality_after <= 100
    assert resp.candidates[0].finish_reason == types.FinishReason.STOP
    assert resp.model_version == MODEL and resp.response_id
    usage = resp.usage_metadata
    text = "Act as a reviewer.\nPlugin: demo-tool\nPlan the enhancement."
    assert usage.prompt_token_count == (len(text) + 3) // 4
    assert usage.candidates_token_count == (len(resp.text) + 3) // 4
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert usage.thoughts_token_count == 0
    rec = emu.requests[-1]
    assert rec.phase == "plan" and rec.text == text and rec.status == 200


def test_skill_answer_is_good_skill(emu, client):
    resp = skill_call(client, "Plugin: ai-agency\nWrite SKILL.md content.")
    draft = msgspec.json.decode(resp.text, type=SkillDraft)
    assert draft.body == sc.good_skill("ai-agency")["body"]
    assert sc.check(msgspec.to_builtins(draft)) == []
    assert emu.requests[-1].phase == "skill"


def test_no_schema_gives_text(client):
    resp = client.models.generate_content(model=MODEL, contents="hello", config=config(None))
    assert resp.text == "OK"


def test_v1_and_v1beta_accepted(emu):
    c = genai.Client(api_key="test-key", vertexai=False,
                     http_options=types.HttpOptions(base_url=emu.url, api_version="v1"))
    assert msgspec.json.decode(plan_call(c).text, type=Plan)
    assert emu.requests[-1].path == f"/v1/models/{MODEL}:generateContent"


def test_model_resource_preflight(emu, client):
    model = client.models.get(model="gemini-2.5-pro")
    assert model.name == "models/gemini-2.5-pro"
    assert model.display_name and model.input_token_limit and model.output_token_limit
    assert "generateContent" in model.supported_actions   # supportedGenerationMethods
    rec = emu.requests[-1]
    assert (rec.method, rec.path, rec.phase) == ("GET", "/v1beta/models/gemini-2.5-pro", None)


def test_count_tokens(client):
    assert client.models.count_tokens(model=MODEL, contents="abcdefgh").total_tokens == 2


# ------------------------------------------------------------------ keys and models


def test_wrong_key_is_400_api_key_invalid(emu):
    with pytest.raises(errors.ClientError) as info:
        plan_call(make_client(emu, key="wrong"))
    exc = info.value
    assert (exc.code, exc.status) == (400, "INVALID_ARGUMENT")
    assert exc.message == "API key not valid. Please pass a valid API key."
    assert detail(exc, "ErrorInfo")["reason"] == "API_KEY_INVALID"
    rec = emu.requests[-1]
    assert rec.api_key_present and rec.status == 400
    assert "wrong" not in repr(rec)


def test_missing_key_is_403(emu):
    req = urllib.request.Request(f"{emu.url}/v1beta/models/{MODEL}:generateContent",
                                 data=json.dumps({"contents": [{"parts": [{"text": "x"}]}]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 403
    assert json.loads(info.value.read())["error"]["status"] == "PERMISSION_DENIED"
    assert emu.requests[-1].api_key_present is False


def test_key_in_query_string_accepted(emu):
    req = urllib.request.Request(f"{emu.url}/v1beta/models/{MODEL}?key=test-key")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read())["name"] == f"models/{MODEL}"


def test_unknown_model_is_404(emu, client):
    with pytest.raises(errors.ClientError) as info:
        plan_call(client, model="gemini-9-ultra")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    with pytest.raises(errors.ClientError) as info:
        client.models.get(model="gemini-9-ultra")
    assert info.value.code == 404


def test_configurable_models():
    with Emulator(models={"gemini-3-flash"}) as e:
        c = make_client(e)
        assert msgspec.json.decode(plan_call(c, model="gemini-3-flash").text, type=Plan)
        with pytest.raises(errors.ClientError):
            plan_call(c, model=MODEL)


# ------------------------------------------------------------------------ faults


def test_rate_limit_minute(emu, client):
    emu.script("rate_limit_minute", times=2, quota_value=15)
    for _ in range(2):
        with pytest.raises(errors.ClientError) as info:
            plan_call(client)
        exc = info.value
        assert (exc.code, exc.status) == (429, "RESOURCE_EXHAUSTED")
        violation = detail(exc, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
        assert violation["quotaValue"] == "15"
        assert violation["quotaDimensions"]["model"] == MODEL
        assert detail(exc, "RetryInfo")["retryDelay"] == "7s"
    assert plan_call(client).text
    assert [r.fault for r in emu.requests] == ["rate_limit_minute"] * 2 + [None]


def test_rate_limit_minute_without_retry_info(emu, client):
    emu.script("rate_limit_minute", retry_delay=None)
    with pytest.raises(errors.ClientError) as info:
        plan_call(client)
    assert detail(info.value, "RetryInfo") is None
    assert detail(info.value, "QuotaFailure") is not None


def test_rate_limit_day(emu, client):
    emu.script("rate_limit_day")
    with pytest.raises(errors.ClientError) as info:
        plan_call(client)
    violation = detail(info.value, "QuotaFailure")["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    assert detail(info.value, "RetryInfo")["retryDelay"] == "43200s"


def test_rate_limit_tokens(emu, client):
    emu.script("rate_limit_tokens")
    with pytest.raises(errors.ClientError) as info:
        plan_call(client)
    violation = detail(info.value, "QuotaFailure")["violations"][0]
    assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute-FreeTier"
    assert "input_token_count" in violation["quotaMetric"]


def test_rate_limit_bare(emu, client):
    emu.script("rate_limit_bare")
    with pytest.raises(errors.ClientError) as info:
        plan_call(client)
    assert info.value.code == 429 and error_details(info.value) == []


@pytest.mark.parametrize("kind,code,status", [("server_error", 500, "INTERNAL"),
                                              ("unavailable", 503, "UNAVAILABLE")])
def test_server_errors_are_not_retried_by_sdk(emu, client, kind, code, status):
    emu.script(kind)
    with pytest.raises(errors.ServerError) as info:
        plan_call(client)
    assert (info.value.code, info.value.status) == (code, status)
    assert len(emu.requests) == 1          # the SDK's own retry is off by default


def test_bad_request_is_a_client_error(emu, client):
    emu.script("bad_request", message="Request payload size exceeds the limit: 20971520 bytes.")
    with pytest.raises(errors.ClientError) as info:
        plan_call(client)
    assert (info.value.code, info.value.status) == (400, "INVALID_ARGUMENT")


def test_retry_options_with_one_attempt_send_one_request(emu):
    c = genai.Client(api_key="test-key", vertexai=False, http_options=types.HttpOptions(
        base_url=emu.url, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1)))
    emu.script("unavailable", times=2)
    with pytest.raises(errors.ServerError):
        plan_call(c)
    assert len(emu.requests) == 1 and emu.pending() == [("unavailable", 1, None)]


def test_timeout(emu):
    emu.script("timeout", delay=5)
    c = make_client(emu, timeout_ms=500)
    start = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        plan_call(c)
    assert time.monotonic() - start < 2
    assert plan_call(c).text               # the next request is answered normally
    assert emu.requests[0].fault == "timeout"


def test_stop_is_prompt_with_sleeping_timeout_handler():
    e = Emulator().start()
    e.script("timeout", delay=30)
    with pytest.raises(httpx2.TimeoutException):
        plan_call(make_client(e, timeout_ms=300))
    start = time.monotonic()
    e.stop()
    assert time.monotonic() - start < 1.5


def test_reset(emu, client):
    emu.script("reset")
    with pytest.raises(httpx2.TransportError) as info:
        plan_call(client)
    assert not isinstance(info.value, httpx2.TimeoutException)
    assert not isinstance(info.value, errors.APIError)
    assert emu.requests[-1].status == "reset"
    assert plan_call(client).text


def test_malformed_body(emu, client):
    emu.script("malformed_body")
    with pytest.raises(json.JSONDecodeError):    # the SDK json.loads the body; not an APIError
        plan_call(client)


def test_invalid_json(emu, client):
    emu.script("invalid_json")
    resp = plan_call(client)
    assert resp.candidates[0].finish_reason == types.FinishReason.STOP
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)


def test_schema_mismatch(emu, client):
    emu.script("schema_mismatch")
    resp = plan_call(client)
    json.loads(resp.text)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(resp.text, type=Plan)


def test_blocked(emu, client):
    emu.script("blocked")
    resp = plan_call(client)
    assert resp.candidates is None and resp.text is None
    assert resp.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert resp.usage_metadata.prompt_token_count > 0


def test_max_tokens(emu, client):
    emu.script("max_tokens")
    resp = skill_call(client)
    assert resp.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)
    assert resp.usage_metadata.candidates_token_count > 0


@pytest.mark.parametrize("kind,reason", [("safety", types.FinishReason.SAFETY),
                                         ("recitation", types.FinishReason.RECITATION)])
def test_safety_and_recitation(emu, client, kind, reason):
    emu.script(kind)
    resp = plan_call(client)
    assert resp.candidates[0].finish_reason == reason
    assert resp.candidates[0].content is None and resp.text is None


def test_empty(emu, client):
    emu.script("empty")
    resp = plan_call(client)
    assert resp.candidates[0].finish_reason == types.FinishReason.STOP
    assert not resp.candidates[0].content.parts and not resp.text


@pytest.mark.parametrize("gate", sc.GATES)
def test_gate_faults_fail_exactly_one_gate(emu, client, gate):
    emu.script(f"gate_{gate}", phase="skill")
    draft = msgspec.json.decode(skill_call(client, "Plugin: web-scraper\nGo.").text,
                                type=SkillDraft)
    assert sc.check(msgspec.to_builtins(draft)) == [gate]


def test_untidy_files_are_a_good_skill_with_crlf_a_bom_and_no_final_newline(emu, client):
    emu.script("untidy_files", phase="skill")
    draft = msgspec.to_builtins(msgspec.json.decode(skill_call(client, "Plugin: web-scraper\nGo.").text,
                                                    type=SkillDraft))
    assert sc.check(draft) == []
    contents = [f["content"] for f in draft["files"]]
    assert all("\r\n" in text for text in contents)
    assert contents[0].startswith("\ufeff") and not contents[-1].endswith("\n")


def test_every_fault_kind_has_a_test():
    source = Path(__file__).read_text()
    for kind in FAULTS:
        assert kind.startswith("gate_") or f'"{kind}"' in source, kind


def test_phase_targeted_fault_waits_for_matching_request(emu, client):
    emu.script("server_error", times=1, phase="skill")
    assert plan_call(client).text                       # plan passes by untouched
    assert emu.pending() == [("server_error", 1, "skill")]
    with pytest.raises(errors.ServerError):
        skill_call(client)
    assert emu.pending() == []
    assert sc.check(json.loads(skill_call(client).text)) == []


def test_unknown_fault_rejected(emu):
    with pytest.raises(ValueError):
        emu.script("meteor_strike")


# ----------------------------------------------------------------- request log


def test_request_log_is_thread_safe_and_complete(emu, client):
    emu.script("unavailable", times=3)
    prompts = [f"Plugin: p{i}\nPlan number {i}." for i in range(12)]

    def call(p: str) -> str:
        try:
            return plan_call(client, p).text and "ok"
        except errors.ServerError:
            return "503"

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, prompts))
    assert results.count("503") == 3
    recs = emu.requests
    assert len(recs) == 12
    assert sorted(r.text for r in recs) == sorted(prompts)
    assert sorted(r.status for r in recs) == [200] * 9 + [503] * 3
    assert all(r.api_key_present and r.model == MODEL and r.method == "POST" for r in recs)
    assert all(r.prompt_tokens == (len(r.text) + 3) // 4 for r in recs)
    assert "test-key" not in repr(recs)


# ----------------------------------------------------------------- quotas


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rpm_sliding_window():
    clock = FakeClock(1_700_000_000.0)
    with Emulator(rpm=3, clock=clock) as e:
        c = make_client(e)
        for i in range(3):
            clock.t += 10
            plan_call(c)
        with pytest.raises(errors.ClientError) as info:
            plan_call(c)
        violation = detail(info.value, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
        assert violation["quotaValue"] == "3"
        assert detail(info.value, "RetryInfo")["retryDelay"] == "40s"   # first one frees at +60
        assert e.requests[-1].fault == "quota_minute"
        clock.t += 40
        plan_call(c)                                         # one slot freed
        with pytest.raises(errors.ClientError):
            plan_call(c)
        assert e.usage(MODEL)["minute_requests"] == 3
        plan_call(c, model="gemini-2.5-pro")                # quotas are per model


def test_admitted_requests_count_even_when_faulted():
    clock = FakeClock(1_700_000_000.0)
    with Emulator(rpm=2, clock=clock) as e:
        c = make_client(e)
        e.script("server_error")
        with pytest.raises(errors.ServerError):
            plan_call(c)
        plan_call(c)
        with pytest.raises(errors.ClientError) as info:
            plan_call(c)
        assert info.value.code == 429 and e.pending() == []


def test_tpm_window():
    clock = FakeClock(1_700_000_000.0)
    prompt = "x" * 400                                       # 100 tokens
    with Emulator(tpm=250, clock=clock) as e:
        c = make_client(e)
        plan_call(c, prompt)
        clock.t += 5
        plan_call(c, prompt)
        clock.t += 5
        with pytest.raises(errors.ClientError) as info:
            plan_call(c, prompt)
        violation = detail(info.value, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute-FreeTier"
        assert violation["quotaValue"] == "250"
        assert detail(info.value, "RetryInfo")["retryDelay"] == "50s"
        clock.t += 50
        plan_call(c, prompt)


def test_rpd_resets_at_pacific_midnight():
    # 23:59:30 Pacific on a summer day (PDT, UTC-7): UTC midnight has long passed.
    start = dt.datetime(2025, 7, 14, 23, 59, 30, tzinfo=PACIFIC).timestamp()
    clock = FakeClock(start)
    with Emulator(rpd=2, clock=clock) as e:
        c = make_client(e)
        plan_call(c)
        plan_call(c)
        with pytest.raises(errors.ClientError) as info:
            plan_call(c)
        violation = detail(info.value, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        assert violation["quotaValue"] == "2"
        assert detail(info.value, "RetryInfo")["retryDelay"] == "30s"
        clock.t += 29
        with pytest.raises(errors.ClientError):
            plan_call(c)
        clock.t += 1                                        # 00:00:00 Pacific
        plan_call(c)
        assert e.usage(MODEL)["day_requests"] == 1


def test_rpd_day_is_pacific_not_utc():
    # 16:59 PDT is 23:59 UTC; one minute later UTC has a new day but Pacific does not.
    clock = FakeClock(dt.datetime(2025, 7, 14, 16, 59, tzinfo=PACIFIC).timestamp())
    with Emulator(rpd=1, clock=clock) as e:
        c = make_client(e)
        plan_call(c)
        clock.t += 120
        with pytest.raises(errors.ClientError) as info:
            plan_call(c)
        delay = detail(info.value, "RetryInfo")["retryDelay"]
        assert delay == f"{7 * 3600 - 60}s"


# ----------------------------------------------------------------- latency, binding, CLI


def test_latency_is_applied():
    with Emulator(latency=(0.15, 0.25), seed=7) as e:
        c = make_client(e)
        for _ in range(3):
            start = time.monotonic()
            plan_call(c)
            assert 0.15 <= time.monotonic() - start < 1.0


def test_binds_loopback_with_daemon_threads(emu, client):
    assert emu._server.server_address[0] == "127.0.0.1"
    assert emu.url == f"http://127.0.0.1:{emu.port}"
    plan_call(client)
    ours = [t for t in threading.enumerate()
            if t.name.startswith("gemini-emulator") or "process_request" in t.name]
    assert ours and all(t.daemon for t in ours)


def test_cli_runs_in_foreground(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tests.emulator", "--port", "0",
                             "--fault", "unavailable", "--times", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        req = urllib.request.Request(f"{url}/v1beta/models/{MODEL}:generateContent",
                                     data=b'{"contents": [{"parts": [{"text": "hi"}]}]}',
                                     headers={"x-goog-api-key": "test-key"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 503
        printed = proc.stdout.readline()
        assert "status=503" in printed and "fault=unavailable" in printed
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# ----------------------------------------------------------------- generators


class Inner(msgspec.Struct, kw_only=True):
    tag: Literal["a", "b"]
    size: Annotated[int, msgspec.Meta(ge=5, le=9)]
    ratio: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5


class Outer(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=20, max_length=30)]
    items: Annotated[list[Inner], msgspec.Meta(min_length=1, max_length=2)]
    maybe: Inner | None = None
    flags: dict[str, bool] = {}
    ok: bool


def test_conform_handles_generic_schemas():
    schema = msgspec.json.schema(Outer)
    value = conform(schema)
    decoded = msgspec.convert(value, type=Outer)
    assert 1 <= len(decoded.items) <= 2
    assert phase_of(schema) == "plan" and phase_of(SKILL_SCHEMA) == "skill"
    assert phase_of(None) is None
    assert msgspec.convert(conform(PLAN_SCHEMA), type=Plan).gaps


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])


@pytest.mark.parametrize("hint", ["the plugin", "ai-agency", "x", "you-tube-helper",
                                  "Database Migration Assistant With A Long Name"])
def test_good_skill_meets_constraints(hint):
    draft = sc.good_skill(hint)
    assert draft == sc.good_skill(hint)                      # deterministic
    assert msgspec.convert(draft, type=SkillDraft)
    text = sc.compose(draft, "x")
    body = draft["body"]
    assert 8_000 <= len(text.encode()) <= 14_000
    assert re.findall(r"^## (.+)$", body, re.M) == list(sc.SECTIONS)
    assert not re.search(r"\byou(r|rs|'re|rself)?\b", text + json.dumps(draft), re.I)
    fences = re.findall(r"^```", body, re.M)
    assert len(fences) % 2 == 0 and len(fences) // 2 >= 3
    paths = {f["path"] for f in draft["files"]}
    links = re.findall(r"\]\(([^)]+)\)", body)
    assert links
    for target in links:
        assert not re.match(r"^[a-z]+:|^/|^#", target)
        if target.startswith(("scripts/", "references/", "assets/")):
            assert target in paths
    everything = text + json.dumps(draft["files"])
    for bad in ("/home/", "/Users/", "/etc/", "C:\\", ".."):
        assert bad not in everything
    desc = draft["description"]
    assert len(desc) < 1024 and "Use when" in desc and 1 <= _sentences(desc) <= 3
    assert draft["allowed_tools"] and all(t[0].isupper() for t in draft["allowed_tools"])
    assert sc.check(draft) == []


@pytest.mark.parametrize("gate", sc.GATES)
def test_bad_skill_fails_only_its_gate(gate):
    assert sc.check(sc.bad_skill(gate, "some-plugin")) == [gate]


@pytest.mark.parametrize("text,hint", [
    ("name: my-skill\nWrite the Agent Skill 'web-scraper' for this plugin.\nplugin name: other",
     "web-scraper"),
    ("Standards: name: example-skill\n<<<PLUGIN_DATA\nplugin name: db-helper\n", "db-helper"),
    ("Plugin: demo-tool\nPlan it.", "demo-tool"),
    ('{"name": "json-named", "version": "1.0"}', "json-named"),
    ("nothing to go on", "the plugin"),
])
def test_name_hint(text, hint):
    assert name_hint(text) == hint
