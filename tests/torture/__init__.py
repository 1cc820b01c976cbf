"""Torture tests: real `overnight` processes killed, starved of disk, fed hostile plugins.

Smoke size by default (part of the ordinary `pytest` run); `OVERNIGHT_TORTURE=full` for the
full size. `python -m tests.torture [smoke|full]` runs the suite and writes
`docs/reliability.md` from the figures the tests collect (see `tests/torture/conftest.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from bisect import bisect_right
from pathlib import Path
from typing import Any

import apsw

from tests.emulator import Emulator, _Scripted
from tests.marketplace_builder import manifest, plugin

SIZE = "full" if os.environ.get("OVERNIGHT_TORTURE", "smoke").strip().lower() == "full" else "smoke"
FULL = SIZE == "full"
REPO = Path(__file__).resolve().parent.parent.parent
CORPUS = REPO.parent / "shared" / "corpus"
KEY = "fake-key-TORTURE-c0ffee-9b1d4e7a"

# Figures collected by the tests, rendered into docs/reliability.md by conftest.py.
FIGURES: dict[str, dict[str, Any]] = {}
_figures_lock = threading.Lock()


def record(part: str, **figures: Any) -> None:
    with _figures_lock:
        FIGURES.setdefault(part, {}).update(figures)


def bump(part: str, key: str, n: int = 1) -> None:
    with _figures_lock:
        slot = FIGURES.setdefault(part, {})
        slot[key] = slot.get(key, 0) + n


# ------------------------------------------------------------------ processes


def child_env(key: str | None = KEY, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GOOGLE_", "GEMINI_", "OVERNIGHT_"))}
    if key is not None:
        env["GOOGLE_API_KEY"] = key
    env.update(extra)
    return env


def spawn(*args: str, key: str | None = KEY, stdout: Any = subprocess.PIPE,
          stderr: Any = subprocess.PIPE, preexec_fn: Any = None, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO,
                            env=child_env(key, **extra), stdout=stdout, stderr=stderr,
                            preexec_fn=preexec_fn)


def cli(*args: Any, key: str | None = KEY, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO,
                          env=child_env(key, **extra), capture_output=True, text=True, timeout=timeout)


def query(db: Path, sql: str, *params: Any) -> list[tuple]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(5000)
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def db_of(root: Path) -> Path:
    return root / ".overnight" / "overnight.db"


def migrated(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        return query(db, "PRAGMA user_version")[0][0] > 0
    except apsw.Error:
        return False


def has_run(db: Path) -> bool:
    return migrated(db) and bool(query(db, "SELECT 1 FROM runs LIMIT 1"))


# ------------------------------------------------------------------ trees


def tree_hashes(root: Path, skip: tuple[str, ...] = (".overnight",)) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) under root, not following links."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        if any(part in skip for part in rel_dir.parts):
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
        for d in list(dirnames):
            out[(rel_dir / d).as_posix() + "/"] = "dir"
    return out


# ------------------------------------------------------------------ marketplaces


def build_corpus(root: Path, count: int, seed: int = 1) -> None:
    """A generated marketplace shaped like ../shared/corpus: categories, a manifest, README,
    commands, agents, some legacy skills/skill-adapter/SKILL.md, hooks, a few unlisted."""
    rng = random.Random(seed)
    categories = ["devops", "security", "ai-ml", "database", "productivity", "testing", "api-development"]
    entries = []
    for i in range(count):
        cat = categories[i % len(categories)]
        name = f"{cat}-tool-{i:03d}"
        files: dict[str, str] = {
            "README.md": f"# {name}\n\n" + "".join(
                f"## Section {s}\n\nThis plugin handles task {i}.{s} for {cat} teams.\n\n"
                for s in range(rng.randint(2, 8))),
        }
        for c in range(rng.randint(1, 4)):
            files[f"commands/cmd-{c}.md"] = f"---\ndescription: command {c}\n---\n# /cmd-{c}\n\nDo step {c}.\n"
        if rng.random() < 0.4:
            files[f"agents/agent-{i}.md"] = f"---\nname: agent-{i}\n---\nReview {cat} changes.\n"
        if rng.random() < 0.5:
            files["skills/skill-adapter/SKILL.md"] = (
                f"---\nname: {name}\ndescription: Legacy skill of {name}.\nauthor: someone\nversion: 1.0.0\n"
                f"---\n\n# {name}\n\nOld body.\n")
        if rng.random() < 0.2:
            files["hooks/hooks.json"] = '{"hooks": {}}'
        plugin(root, f"plugins/{cat}/{name}", name, description=f"Tool {i} for {cat}.",
               version="1.0.0", files=files)
        if rng.random() < 0.9:  # a few plugins are unlisted, like the real corpus
            entries.append({"name": name, "source": f"./plugins/{cat}/{name}", "category": cat})
    manifest(root, entries)


# ------------------------------------------------------------------ the emulator


RANDOM_FAULTS = ("server_error", "unavailable", "reset", "malformed_body", "invalid_json",
                 "schema_mismatch", "blocked", "max_tokens", "safety", "recitation", "empty",
                 "rate_limit_minute", "rate_limit_bare", "timeout", "gate_sections", "gate_voice")


class FaultyEmulator(Emulator):
    """The emulator with a seeded random fault on `rate` of generateContent requests, on top of
    whatever is scripted. Faults are chosen so that a retry can succeed (no daily quota)."""

    def __init__(self, *args: Any, rate: float = 0.05, fault_seed: int = 0, quota_value: int = 100000,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rate = rate
        self.quota_value = quota_value  # what a random 429 teaches: never below the run's --rpm
        self._fault_rng = random.Random(fault_seed)
        self.injected: dict[str, int] = {}

    def _take_fault(self, phase: str | None) -> _Scripted | None:
        scripted = super()._take_fault(phase)
        if scripted is not None or self.rate <= 0:
            return scripted
        with self._lock:
            if self._fault_rng.random() >= self.rate:
                return None
            kinds = [k for k in RANDOM_FAULTS if phase == "skill" or not k.startswith("gate_")]
            kind = self._fault_rng.choice(kinds)
            self.injected[kind] = self.injected.get(kind, 0) + 1
        params: dict[str, Any] = {}
        if kind == "rate_limit_minute":
            params["retry_delay"] = "1s"
            params["quota_value"] = self.quota_value
        if kind == "timeout":
            params["delay"] = 2.5
        return _Scripted(kind, 1, phase, params)


def posts(emu: Emulator) -> list:
    return [r for r in emu.requests if r.method == "POST" and r.path.endswith(":generateContent")]


# ------------------------------------------------------------------ invariants


def max_in_window(times: list[float], width: float = 60.0) -> int:
    """The largest number of instants within any half-open window [t, t + width)."""
    times = sorted(times)
    best = 0
    for i, t in enumerate(times):
        best = max(best, bisect_right(times, t + width - 1e-9) - i)
    return best


def quota_windows(db: Path) -> dict[str, int]:
    by_model: dict[str, list[float]] = {}
    for model, sent in query(db, "SELECT model, sent_at FROM quota_ledger"):
        by_model.setdefault(model, []).append(sent)
    return {m: max_in_window(t) for m, t in by_model.items()}


def repeated_answers(db: Path) -> list[str]:
    """Plugin streams holding more than one PlanReceived or SkillReceived in a discovery cycle
    (a cycle starts at PluginDiscovered; a skill answer that failed a gate is a recorded retry)."""
    problems = []
    rows = query(db, "SELECT stream, type FROM events WHERE stream LIKE 'plugin:%' ORDER BY seq")
    cycles: dict[str, dict[str, int]] = {}
    for stream, kind in rows:
        c = cycles.setdefault(stream, {})
        if kind == "PluginDiscovered":
            c.clear()
        c[kind] = c.get(kind, 0) + 1
        if kind == "PlanReceived" and c[kind] > 1:
            problems.append(f"{stream}: PlanReceived twice in one cycle")
        if kind == "SkillReceived" and c[kind] > 1 + c.get("SkillGateFailed", 0):
            problems.append(f"{stream}: SkillReceived repeated without a gate failure")
        if kind == "PluginDone" and c[kind] > 1:
            problems.append(f"{stream}: PluginDone twice in one cycle")
    return problems


def json_or(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
