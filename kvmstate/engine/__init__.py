"""The engine: the dependency graph (``graph``), the generic walk over it (``walker``) and
the reconcile layer on top (``reconcile``: plan, re-check, apply, rounds, retries). It knows no
resource kind, no transport and no spec model: only the protocols in ``contract``."""

from kvmstate.engine.reconcile import (
    Blocked,
    Engine,
    EngineConfig,
    describe,
    is_temporary,
    nx_ancestors,
)

__all__ = ["Blocked", "Engine", "EngineConfig", "describe", "is_temporary", "nx_ancestors"]
