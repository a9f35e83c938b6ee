"""Lifecycle on the fake KVM hosts: a graceful shutdown with a timeout before the power-off,
and pending restarts converged by an explicit, opt-in restart (``apply --restart-pending`` or
``restart: on-change``)."""

from __future__ import annotations

from fakelab import LAB_SPEC, converge, converge_upto, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.cli.apply import ApplyArgs
from kvmstate.cli.parser import build_parser, typed
from kvmstate.engine import Engine
from kvmstate.model import Action, Event, Message
from kvmstate.resources import REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.testing.fake import FakeCluster

OFF = "    state: shut-off\n"


def state(cluster: FakeCluster) -> virt.DomainState | None:
    return virt.observe_domain(cluster["kvm-1"].conn(), "guest")


def messages(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, Message)]


def test_shut_off_asks_the_guest_first(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    off = make_spec(LAB_SPEC.replace("    state: running\n", OFF))
    events: list[Event] = []
    change = run(plan(find(off, "domain"), RunContext(off, cluster)))
    assert [(d.field, d.before, d.after) for d in change.diffs] == [
        ("state", "running", "shut-off")
    ]
    octx = RunContext(off, cluster, events=events.append)
    assert run(converge(find(off, "domain"), octx)).is_noop
    assert cluster["kvm-1"].shutdown_requests == ["guest"]
    assert state(cluster).state == "shut-off"  # type: ignore[union-attr]
    assert any("the guest shut down in" in m for m in messages(events)), messages(events)


def test_a_guest_that_does_not_answer_is_powered_off_after_the_timeout(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "domain"))
    cluster["kvm-1"].ignores_acpi.add("guest")
    off = make_spec(LAB_SPEC.replace("    state: running\n", OFF + "    shutdown_timeout: 300ms\n"))
    events: list[Event] = []
    octx = RunContext(off, cluster, events=events.append)
    assert run(converge(find(off, "domain"), octx)).is_noop
    assert cluster["kvm-1"].shutdown_requests == ["guest"]
    assert state(cluster).state == "shut-off"  # type: ignore[union-attr]
    assert any(
        "did not shut down within 300ms (shutdown_timeout): powering it off" in m
        for m in messages(events)
    ), messages(events)


def test_shutdown_timeout_zero_powers_off_at_once(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    off = make_spec(LAB_SPEC.replace("    state: running\n", OFF + "    shutdown_timeout: 0s\n"))
    assert run(converge(find(off, "domain"), RunContext(off, cluster))).is_noop
    assert cluster["kvm-1"].shutdown_requests == []
    assert state(cluster).state == "shut-off"  # type: ignore[union-attr]


BIGGER = LAB_SPEC.replace("memory: 128MiB", "memory: 256MiB")


def _pending(cluster: FakeCluster, ctx: RunContext) -> None:
    """Converge, then grow the memory: the persistent config changes, the guest waits."""
    run(converge_upto(ctx, "domain"))
    spec = make_spec(BIGGER)
    after = run(converge(find(spec, "domain"), RunContext(spec, cluster)))
    assert after.is_noop and after.pending and "--restart-pending" in after.reason


def test_restart_pending_restarts_gracefully_and_converges(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    _pending(cluster, ctx)
    spec = make_spec(BIGGER)
    # without the flag: pending restart (plan exits 2); with it: a change that says restart
    assert run(plan(find(spec, "domain"), RunContext(spec, cluster))).is_noop
    events: list[Event] = []
    rctx = RunContext(spec, cluster, Options(restart_pending=True), events.append)
    change = run(plan(find(spec, "domain"), rctx))
    assert change.action is Action.UPDATE
    assert [(d.field, d.drift) for d in change.diffs] == [
        ("current_kib", "pending-restart"),
        ("restart", "runtime"),
    ]
    engine = Engine(REGISTRY.graph(spec), rctx)
    report = run(engine.apply(run(engine.plan())))
    assert report.converged, report.as_dict()
    st = state(cluster)
    assert st is not None and st.state == "running" and st.live is not None
    assert st.live.memory_kib == 262144
    assert cluster["kvm-1"].shutdown_requests == ["guest"]
    assert any("restarted to apply current_kib" in m for m in messages(events))
    # and every later plan, with or without the flag, is empty
    assert not run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster)).plan()).has_changes


def test_restart_on_change_needs_no_flag(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    spec = make_spec(
        BIGGER.replace("    state: running\n", "    restart: on-change\n    state: running\n")
    )
    dctx = RunContext(spec, cluster)
    change = run(plan(find(spec, "domain"), dctx))
    # the config change and the restart it needs are shown together, applied in one go
    assert [d.field for d in change.diffs] == ["memory_kib", "current_kib", "restart"]
    assert run(converge(find(spec, "domain"), dctx)).is_noop
    st = state(cluster)
    assert st is not None and st.live is not None and st.live.memory_kib == 262144
    assert cluster["kvm-1"].shutdown_requests == ["guest"]


def test_a_balloon_change_needs_no_restart(cluster: FakeCluster, ctx: RunContext) -> None:
    """Memory set lower fits under the live maximum: set live, nothing restarted."""
    run(converge_upto(ctx, "domain"))
    spec = make_spec(LAB_SPEC.replace("memory: 128MiB", "memory: 96MiB"))
    rctx = RunContext(spec, cluster, Options(restart_pending=True))
    assert run(converge(find(spec, "domain"), rctx)).is_noop
    assert cluster["kvm-1"].shutdown_requests == []


def test_the_flag_reaches_the_run_options() -> None:
    ns = build_parser().parse_args(["apply", "x.yaml", "--restart-pending", "--auto-approve"])
    assert typed(ApplyArgs, ns).restart_pending
    ns = build_parser().parse_args(["apply", "x.yaml"])
    assert not typed(ApplyArgs, ns).restart_pending
    ev = build_parser().parse_args(["evacuate", "kvm-1", "x.yaml"])
    assert ev.restart_pending is False
