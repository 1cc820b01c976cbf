"""Builds small marketplaces in a temporary directory for discovery and analysis tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def manifest(root: Path, plugins: list[Any] | Any) -> Path:
    """Write .claude-plugin/marketplace.json listing `plugins` (or any JSON value as the list)."""
    return write(root / ".claude-plugin" / "marketplace.json",
                 json.dumps({"name": "test-marketplace", "plugins": plugins}, indent=2))


def plugin(root: Path, rel: str, name: str | None = "demo", *,
           files: dict[str, str | bytes] | None = None, **fields: Any) -> Path:
    """A plugin directory at `rel` with .claude-plugin/plugin.json and the given extra files."""
    directory = root / rel
    data = {"name": name, **fields} if name is not None else dict(fields)
    write(directory / ".claude-plugin" / "plugin.json", json.dumps(data, indent=2))
    for path, content in (files or {}).items():
        write(directory / path, content)
    return directory


def skill_md(name: str, description: str = "Does a thing. Use when a thing is needed.",
             **extra: str) -> str:
    lines = [f"name: {name}", f"description: {description}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n# Title\n\nBody.\n"
