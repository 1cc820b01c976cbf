"""Event types, their schema versions and upcasters.

Invariants:
- An event type is a frozen msgspec Struct subclass of `Event` with a stable tag; the tag
  is what the log stores in `events.type` and inside the JSON payload (`$.type`).
- Every type has a `schema_version` (ClassVar). A payload stored under an older version is
  brought up to date by the registered upcasters, one version step at a time, before it is
  converted into the Struct. Payloads already at the current version take the fast path.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Union

import msgspec

from events.errors import UndecodableEvent

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event type. Subclasses set `tag=...` and may raise schema_version."""

    schema_version: ClassVar[int] = 1


class Registry:
    """The set of event types a log may hold, with their upcasters."""

    def __init__(
        self,
        types: Iterable[type[Event]],
        upcasters: dict[tuple[str, int], Upcaster] | None = None,
    ) -> None:
        self.types: dict[str, type[Event]] = {}
        for cls in types:
            tag = cls.__struct_config__.tag
            if not isinstance(tag, str):
                raise TypeError(f"{cls.__name__} needs an explicit string tag")
            if tag in self.types:
                raise TypeError(f"duplicate event tag {tag!r}")
            self.types[tag] = cls
        self.upcasters = dict(upcasters or {})
        for (tag, version) in self.upcasters:
            if tag not in self.types:
                raise TypeError(f"upcaster for unknown event type {tag!r}")
            if version >= self.types[tag].schema_version:
                raise TypeError(f"upcaster {tag} v{version} is not older than the type")
        union = Union[tuple(self.types.values())] if self.types else msgspec.Raw  # type: ignore[valid-type]
        self._decoder = msgspec.json.Decoder(union)
        self._encoder = msgspec.json.Encoder()

    def tag(self, event: Event) -> str:
        return type(event).__struct_config__.tag  # type: ignore[return-value]

    def encode(self, event: Event) -> bytes:
        if self.types.get(type(event).__struct_config__.tag) is not type(event):
            raise TypeError(f"{type(event).__name__} is not a registered event type")
        return self._encoder.encode(event)

    def decode(self, tag: str, schema_version: int, data: bytes | str) -> Event:
        cls = self.types.get(tag)
        if cls is None:
            raise UndecodableEvent(f"unknown event type {tag!r} (written by a newer version of this program, "
                                   "which added it, or damaged)")
        try:
            if schema_version == cls.schema_version:
                event = self._decoder.decode(data)
                if type(event) is not cls:
                    raise UndecodableEvent(f"payload is tagged {self.tag(event)!r}, envelope says {tag!r}")
                return event
            if schema_version > cls.schema_version:
                raise UndecodableEvent(
                    f"{tag} v{schema_version} is newer than this program knows (v{cls.schema_version})"
                )
            raw = msgspec.json.decode(data)
            if not isinstance(raw, dict):
                raise UndecodableEvent("payload is not a JSON object")
            for version in range(schema_version, cls.schema_version):
                upcast = self.upcasters.get((tag, version))
                if upcast is None:
                    raise UndecodableEvent(f"no upcaster for {tag} v{version}")
                raw = upcast(raw)
            raw["type"] = tag
            return msgspec.convert(raw, cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise UndecodableEvent(f"{tag} v{schema_version}: {e}") from e
