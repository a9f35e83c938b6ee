"""Resource identity: ``pool:kvm-1:images``, ``domain:web``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ResourceId:
    kind: str
    name: str
    host: str | None = None

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
