"""Many migrations in one apply (issue 5): ordered so that no host's memory is overcommitted on
the way. Two domains swapping hosts, one target too full until the other domain leaves it, a
swap between two full hosts, and two domains onto one host that takes only one of them."""

from __future__ import annotations

from typing import Any

from fakelab import make_spec, prepare, run
from specedit import add_second_guest

from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Plan, Report, Status
from kvmstate.resources import KINDS
from kvmstate.resources.base import Event, Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

A, B = ResourceId("placement", "guest"), ResourceId("placement", "guest2")


def two_guests(a_on: str, b_on: str, caps: dict[str, str] | None = None) -> Spec:
    data: dict[str, Any] = make_spec().model_dump(mode="json", exclude_none=True)
    return Spec.model_validate(add_second_guest(data, "guest", "guest2", a_on, b_on, caps or {}))


def engine(spec: Spec, cluster: FakeCluster, events: list[Event] | None = None) -> Engine:
    ctx = RunContext(spec, cluster, Options(), events.append if events is not None else None)
    return Engine(build_graph(spec, KINDS), ctx)


def running_where(cluster: FakeCluster) -> dict[str, str]:
    out = {}
    for h in ("kvm-1", "kvm-2"):
        for dom in cluster[h].conn().listAllDomains(0):
            if dom.isActive():
                assert dom.name() not in out, f"{dom.name()} runs on two hosts"
                out[dom.name()] = h
    return out


def setup(caps: dict[str, str]) -> FakeCluster:
    spec = two_guests("kvm-1", "kvm-2", caps)
    cluster = FakeCluster(spec)
    prepare(cluster)
    report: Report = run(engine(spec, cluster).apply())
    assert report.converged, report.as_dict()
    assert running_where(cluster) == {"guest": "kvm-1", "guest2": "kvm-2"}
    return cluster


def test_a_swap_waits_for_the_domain_leaving_the_fuller_host() -> None:
    # kvm-2 holds guest2 (128 MiB) under a 200 MiB cap: guest fits there only once guest2 left
    caps = {"kvm-1": "300MiB", "kvm-2": "200MiB"}
    cluster = setup(caps)
    swapped = two_guests("kvm-2", "kvm-1", caps)
    p: Plan = run(engine(swapped, cluster).plan())
    a, b = p.get(A), p.get(B)
    assert a is not None and b is not None
    assert (a.action, b.action) == (Action.MIGRATE, Action.MIGRATE)
    assert a.blocked is None and b.blocked is None
    assert a.after == (B,) and b.after == ()
    assert "after guest2 leaves kvm-2" in a.reason
    assert a.as_dict()["after"] == ["placement:guest2"]
    memory = next(c for c in a.checks if c.name == "memory")
    assert memory.ok and memory.detail.endswith(
        "128 of 200 MiB (max_guest_memory), guest needs 128 MiB: room once guest2 leaves kvm-2"
    ), memory

    events: list[Event] = []
    report = run(engine(swapped, cluster, events).apply(p))
    assert report.converged, report.as_dict()
    assert running_where(cluster) == {"guest": "kvm-2", "guest2": "kvm-1"}
    order = [
        (e["event"], e.get("domain") or e.get("id"))
        for e in events
        if e["event"] == "migration-done"
        or (e["event"] == "apply-start" and str(e["id"]).startswith("placement"))
    ]
    assert order.index(("migration-done", "guest2")) < order.index(("apply-start", str(A))), order
    assert not run(engine(swapped, cluster).plan()).has_changes


def test_a_swap_between_two_full_hosts_is_blocked_and_nothing_moves() -> None:
    caps = {"kvm-1": "200MiB", "kvm-2": "200MiB"}
    cluster = setup(caps)
    swapped = two_guests("kvm-2", "kvm-1", caps)
    p = run(engine(swapped, cluster).plan())
    for rid in (A, B):
        c = p.get(rid)
        assert c is not None and c.blocked is not None
        assert "no order of this apply's migrations makes room" in c.blocked
        assert "need a third host" in c.blocked
    report = run(engine(swapped, cluster).apply(p))
    assert not report.converged
    assert {o.id: o.status for o in report.outcomes if o.id in (A, B)} == {
        A: Status.BLOCKED,
        B: Status.BLOCKED,
    }
    assert running_where(cluster) == {"guest": "kvm-1", "guest2": "kvm-2"}


def test_two_domains_onto_a_host_with_room_for_one() -> None:
    caps = {"kvm-1": "300MiB"}
    cluster = setup(caps)
    both_on_1 = two_guests("kvm-1", "kvm-1", caps)  # guest2: kvm-2 -> kvm-1 (256 <= 300): fits
    p = run(engine(both_on_1, cluster).plan())
    b = p.get(B)
    assert b is not None and b.action is Action.MIGRATE and b.blocked is None
    # and a third 128 MiB guest onto kvm-1 would not: the cap counts what already runs there
    assert running_where(cluster)["guest"] == "kvm-1"
    report = run(engine(both_on_1, cluster).apply(p))
    assert report.converged
    caps_tight = {"kvm-1": "200MiB"}
    back = two_guests("kvm-1", "kvm-2", caps_tight)
    run(engine(back, cluster).apply())
    assert running_where(cluster) == {"guest": "kvm-1", "guest2": "kvm-2"}
    tight = two_guests("kvm-1", "kvm-1", caps_tight)
    p = run(engine(tight, cluster).plan())
    b = p.get(B)
    assert b is not None and b.blocked is not None and "no order" in b.blocked


def test_concurrent_migrations_onto_one_host_never_add_up_past_it() -> None:
    # both guests leave kvm-1 for kvm-2, which has room for one of them
    cluster = setup({})
    assert run(engine(two_guests("kvm-1", "kvm-1", {}), cluster).apply()).converged
    assert running_where(cluster) == {"guest": "kvm-1", "guest2": "kvm-1"}
    caps = {"kvm-2": "200MiB"}
    p = run(engine(two_guests("kvm-2", "kvm-2", caps), cluster).plan())
    a, b = p.get(A), p.get(B)
    assert a is not None and a.blocked is None
    assert b is not None and b.blocked is not None
    assert "cannot take guest2 together with the other migrations onto it" in b.blocked

    # A stale plan (made when kvm-2 had room for both) applied with both migrations running
    # at once: each checks kvm-2 again under its lock, net of what the other holds there.
    stale = run(engine(two_guests("kvm-2", "kvm-2", {"kvm-2": "300MiB"}), cluster).plan())
    assert not any(c.blocked for c in stale.changes)
    spec = two_guests("kvm-2", "kvm-2", caps)
    data = spec.model_dump(mode="json", exclude_none=True)
    data["hosts"]["kvm-1"]["migrations"] = {"outgoing": 2, "incoming": 2}
    report = run(engine(Spec.model_validate(data), cluster).apply(stale))
    assert not report.converged
    where = running_where(cluster)
    assert sorted(where.values()) == ["kvm-1", "kvm-2"], where  # one moved, one refused
    refused = [o for o in report.outcomes if o.id in (A, B) and o.status is not Status.CHANGED]
    assert len(refused) == 1 and "memory" in (refused[0].error or ""), refused
