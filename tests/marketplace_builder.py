"""Builds small marketplaces in a temporary directory for discovery and analysis tests."""

from __future__ import annotations

import json
import os
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


def deep_tree(top: Path, levels: int, text: str = "at the bottom\n") -> None:
    """`levels` nested directories `d` below `top`, with f.txt holding `text` at the bottom; made
    relative to a descriptor, since the path soon outgrows what one call may name."""
    deep = os.open(top, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=deep)
            inner = os.open("d", os.O_RDONLY, dir_fd=deep)
            os.close(deep)
            deep = inner
        with open(os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep), "w") as f:
            f.write(text)
    finally:
        os.close(deep)


def bottom(top: Path, levels: int) -> str:
    """The text of f.txt at the bottom of a `deep_tree`."""
    deep = os.open(top, os.O_RDONLY)
    try:
        for _ in range(levels):
            inner = os.open("d", os.O_RDONLY, dir_fd=deep)
            os.close(deep)
            deep = inner
        with open(os.open("f.txt", os.O_RDONLY, dir_fd=deep)) as f:
            return f.read()
    finally:
        os.close(deep)


def remove_deep(root: Path) -> None:
    """Remove `root` however deep it is (pytest's own clean-up of tmp_path recurses)."""
    from statemachine.writes import remove_tree
    fd = os.open(root.parent, os.O_RDONLY)
    try:
        remove_tree(fd, root.name)
    finally:
        os.close(fd)
