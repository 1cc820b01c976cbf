"""The event catalogue: every event overnight records, as frozen msgspec Structs.

Names are past tense; tags are stable forever (they are stored). Change a type by adding
fields with defaults, or by raising its `schema_version` and registering an upcaster in
UPCASTERS. Streams:
- `plugin:<plugin id>`: the lifecycle of one plugin (see lifecycle.TRANSITIONS);
- `run:<run id>`:       one batch run (configuration, pauses, limits, interruptions, end,
                        requests its process never saw answered);
- `quota:<model>`:      limits learned from 429 answers;
- `backup`:             completed off-site backups;
- `marketplace`:        the marketplace the log serves (a scan binds it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from events import Event, Registry

# ------------------------------------------------------------------ shared values


class SkillFact(msgspec.Struct, frozen=True, kw_only=True):
    """An existing skill directory of a plugin and what the reference validator says of it."""

    dir: str
    bytes: int = 0
    valid: bool = False
    errors: list[str] = []
    license: str | None = None  # its frontmatter's, kept when overnight replaces the SKILL.md


class PluginFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What analysis found in a plugin directory. Text excerpts are not stored here."""

    version: str | None = None
    description: str | None = None
    keywords: list[str] = []
    license: str | None = None  # plugin.json's (the manifest entry's as fallback)
    readme_bytes: int | None = None
    commands: list[str] = []
    agents: list[str] = []
    skills: list[SkillFact] = []
    hooks: bool = False
    mcp: bool = False
    scripts: int = 0
    files: int = 0
    bytes: int = 0
    warnings: list[str] = []
    # The analysis that found these facts (analysis.ANALYZER); 1 (the default, so facts recorded
    # before the field existed read as 1) did not read licenses.
    analyzer: int = 1


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts of one Gemini answer (usage_metadata)."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0


Score = Annotated[int, msgspec.Meta(ge=0, le=100)]


class Gap(msgspec.Struct, frozen=True, kw_only=True):
    priority: Literal["high", "medium", "low"]
    description: str


class BundledFile(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    purpose: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """The enhancement plan Gemini returns as structured output (phase 1)."""

    gaps: list[Gap]
    quality_before: Score
    quality_after: Score
    sections_to_add: list[str]
    bundled_files: list[BundledFile]
    trigger_phrases: list[str]
    allowed_tools: list[str]


class DraftFile(msgspec.Struct, frozen=True, kw_only=True):
    """A bundled file the model proposes, relative to the skill directory."""

    path: str
    content: str


class SkillDraft(msgspec.Struct, frozen=True, kw_only=True):
    """What Gemini returns as structured output in phase 2. The frontmatter is not in it:
    the code composes it from validated fields (name = skill directory = normalized plugin name)."""

    description: str
    allowed_tools: list[str]
    body: str
    files: list[DraftFile] = []


class FileWrite(msgspec.Struct, frozen=True, kw_only=True):
    """One file a write step puts in place: path relative to the plugin, content blob hash."""

    path: str
    sha256: str


class Move(msgspec.Struct, frozen=True, kw_only=True):
    """A directory rename inside the plugin (a legacy skill dir to `skills/<name>/`)."""

    src: str
    dst: str


# ------------------------------------------------------------ plugin lifecycle


class PluginDiscovered(Event, frozen=True, tag="PluginDiscovered"):
    """A plugin was found (or found again after its content changed)."""

    plugin_id: str
    name: str
    category: str
    path: str
    listed: bool
    skill_name: str | None = None


class PluginAnalyzed(Event, frozen=True, tag="PluginAnalyzed"):
    content_hash: str
    facts: PluginFacts


class PluginInvalid(Event, frozen=True, tag="PluginInvalid"):
    """The plugin cannot be processed as it is; `reason` says why in one line."""

    reason: str
    content_hash: str | None = None


class PluginVanished(Event, frozen=True, tag="PluginVanished"):
    reason: str


class PluginSkipped(Event, frozen=True, tag="PluginSkipped"):
    run_id: str
    reason: str


# How the reason of a plugin skipped to keep a person's edit begins (status lists those plugins).
KEPT_EDIT = "edited by hand after overnight wrote"


class PlanRequested(Event, frozen=True, tag="PlanRequested"):
    """Recorded before the Gemini call is sent; the quota ledger counts it at once."""

    run_id: str
    request_id: str
    model: str
    attempt: int
    est_input_tokens: int


class PlanReceived(Event, frozen=True, tag="PlanReceived"):
    run_id: str
    request_id: str
    plan: Plan
    usage: Usage


class PlanReused(Event, frozen=True, tag="PlanReused"):
    """`--retry` took up a plugin whose last pass failed at its skill step: the plan that pass
    received (`request_id`), which a new request would ask for with the very same prompt (the
    same files, facts, name, model and standards), is used again; nothing is sent."""

    run_id: str
    request_id: str


class SkillRequested(Event, frozen=True, tag="SkillRequested"):
    run_id: str
    request_id: str
    model: str
    attempt: int
    est_input_tokens: int
    feedback: list[str] = []


class SkillReceived(Event, frozen=True, tag="SkillReceived"):
    """The model's content fields, stored as a blob (JSON) referenced by hash."""

    run_id: str
    request_id: str
    draft_sha256: str
    usage: Usage


class RequestFailed(Event, frozen=True, tag="RequestFailed"):
    """A Gemini call ended without a usable answer and will be tried again after `not_before`.

    kind: rate_limited_minute | rate_limited_day | rate_limited | server | timeout |
          connection | blocked | truncated | empty | invalid_answer.
    """

    run_id: str
    request_id: str
    step: Literal["plan", "skill"]
    kind: str
    message: str
    status_code: int | None = None
    not_before: str | None = None
    usage: Usage | None = None


class SkillGateFailed(Event, frozen=True, tag="SkillGateFailed"):
    """Generated content failed validation; it will be regenerated with `reasons` as feedback."""

    run_id: str
    attempt: int
    reasons: list[str]


class SkillRejected(Event, frozen=True, tag="SkillRejected"):
    run_id: str
    reasons: list[str]


class SkillValidated(Event, frozen=True, tag="SkillValidated"):
    run_id: str
    skill_name: str
    files: list[FileWrite]


class PluginSnapshotted(Event, frozen=True, tag="PluginSnapshotted"):
    """The plugin tree before any change, stored as a tree blob."""

    run_id: str
    tree_sha256: str


class WriteIntended(Event, frozen=True, tag="WriteIntended"):
    """Recorded before the first rename; a resume settles it by hashing the targets."""

    run_id: str
    writes: list[FileWrite]
    moves: list[Move] = []


class WriteCompleted(Event, frozen=True, tag="WriteCompleted"):
    run_id: str
    settled_by: Literal["rename", "hash-check"] = "rename"


class PluginDone(Event, frozen=True, tag="PluginDone"):
    """Finished; `content_hash` is the plugin tree after the write, to detect later changes."""

    run_id: str
    content_hash: str


class PluginFailed(Event, frozen=True, tag="PluginFailed"):
    """The plugin stops here; after a request, that request's failure (`request_id`,
    `status_code`, `kind` as in RequestFailed, and the tokens it used)."""

    run_id: str
    step: str
    reason: str
    request_id: str | None = None
    status_code: int | None = None
    kind: str | None = None
    usage: Usage | None = None


class PluginRestored(Event, frozen=True, tag="PluginRestored"):
    """The plugin directory was put back to a snapshot; it will be analyzed again."""

    tree_sha256: str
    # A snapshot of the files the restore replaced (None when they were the same), so a
    # restore can be undone; absent from restores recorded before it was kept.
    replaced_sha256: str | None = None


# ---------------------------------------------------------------- run streams


class RunStarted(Event, frozen=True, tag="RunStarted"):
    """The effective configuration of a run; never contains a secret."""

    run_id: str
    command: str
    config: dict[str, Any]
    plugins: int
    selection: list[str] = []


class LimitsChanged(Event, frozen=True, tag="LimitsChanged"):
    """Limits or budgets changed mid-run (resume flags or config file), with why.

    `explicit` names the limits the user stated; they override limits learned from Gemini before.
    """

    run_id: str
    limits: dict[str, Any]
    reason: str
    budgets: dict[str, Any] = {}
    explicit: list[str] = []


class BackupTargetChanged(Event, frozen=True, tag="BackupTargetChanged"):
    """Where the run backs up to when it finishes or pauses changed on resume (`backup_to`,
    without credentials; None: no backup any more), for example after a restore of an older
    snapshot, whose log the recorded URL no longer takes."""

    run_id: str
    backup_to: str | None
    reason: str


class RunPaused(Event, frozen=True, tag="RunPaused"):
    """The run waits (for example for the daily quota reset) until `until`."""

    run_id: str
    reason: str
    until: str


class RunResumed(Event, frozen=True, tag="RunResumed"):
    """`overnight resume` continued the run with its recorded configuration."""

    run_id: str


class RunInterrupted(Event, frozen=True, tag="RunInterrupted"):
    """SIGINT, SIGTERM or SIGHUP (the terminal closed, unless nohup ignores it) stopped the run cleanly."""

    run_id: str
    signal: str


class BudgetExhausted(Event, frozen=True, tag="BudgetExhausted"):
    """A request, token or cost budget was reached; the run stopped and can resume."""

    run_id: str
    budget: str
    limit: float
    used: float


class RunFinished(Event, frozen=True, tag="RunFinished"):
    """No plugin of the run has work left (complete) or some ended failed (incomplete).

    `counts`: the states of the plugins this run finished (or left unfinished);
    `by_other_runs`: those of its plugins another run finished (each plugin is credited to
    the run that finished it). Logged before `by_other_runs` existed, it reads as empty.
    """

    run_id: str
    outcome: Literal["complete", "incomplete"]
    counts: dict[str, int]
    by_other_runs: dict[str, int] = {}


class RequestLost(Event, frozen=True, tag="RequestLost"):
    """A request sent by this run whose answer was never recorded: its process stopped first.

    Recorded by a run stopped by a signal for its requests still in flight (with its
    RunInterrupted, in one transaction), and by the next run or resume for every request
    left pending in the ledger (after kill -9, a crash or power loss). The request still
    counts against the quota; its plugin sends it again under a new id.
    """

    run_id: str
    request_id: str


class LimitLearned(Event, frozen=True, tag="LimitLearned"):
    """A 429's QuotaFailure told us the real limit of one metric for one model."""

    model: str
    metric: Literal["rpm", "rpd", "tpm", "tpd"]
    value: int
    quota_id: str


class BackupCompleted(Event, frozen=True, tag="BackupCompleted"):
    """Log, blobs and a tree snapshot were shipped off-site; `target` has no credentials."""

    target: str
    last_seq: int
    snapshot_id: str
    blobs_sent: int
    bytes_sent: int


class MarketplaceBound(Event, frozen=True, tag="MarketplaceBound"):
    """The log serves the marketplace at `root` (resolved) from here on: recorded by its first
    scan, and by a scan of the marketplace moved elsewhere. A scan of another marketplace with
    this log (a wrong --db, a leftover OVERNIGHT_DB) is refused while `root` still exists."""

    root: str


EVENT_TYPES: tuple[type[Event], ...] = (
    PluginDiscovered, PluginAnalyzed, PluginInvalid, PluginVanished, PluginSkipped,
    PlanRequested, PlanReceived, PlanReused, SkillRequested, SkillReceived, RequestFailed,
    SkillGateFailed, SkillRejected, SkillValidated, PluginSnapshotted, WriteIntended,
    WriteCompleted, PluginDone, PluginFailed, PluginRestored,
    RunStarted, LimitsChanged, BackupTargetChanged, RunPaused, RunResumed, RunInterrupted, BudgetExhausted,
    RunFinished, RequestLost, LimitLearned, BackupCompleted, MarketplaceBound,
)

# (tag, stored schema version) -> function lifting the payload one version up.
UPCASTERS: dict[tuple[str, int], Any] = {}

REGISTRY = Registry(EVENT_TYPES, UPCASTERS)
