"""Resource identity: ``pool:kvm-1:images``, ``domain:web``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceId:
    """``kind``, ``name`` and, for a resource that lives on one host, ``host``. Printed, parsed
    and ordered as ``kind:host:name`` (ids sort the way they read)."""

    kind: str
    name: str
    host: str | None = None

    def sort_key(self) -> tuple[str, str, str]:
        return (self.kind, self.host or "", self.name)

    def __lt__(self, other: ResourceId) -> bool:
        return self.sort_key() < other.sort_key()

    def __le__(self, other: ResourceId) -> bool:
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: ResourceId) -> bool:
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: ResourceId) -> bool:
        return self.sort_key() >= other.sort_key()

    def __str__(self) -> str:
        return f"{self.kind}:{self.host}:{self.name}" if self.host else f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> ResourceId:
        parts = text.split(":")
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        if len(parts) == 3:
            return cls(parts[0], parts[2], parts[1])
        raise ValueError(f"not a resource id: {text!r} (kind:name or kind:host:name)")
