"""A libvirt network on each listed host: NAT with DHCP (libvirt's ``default``/``virbr0``),
isolated, or bridge (guests attached to an existing host bridge). Defined, started,
autostarted; a network stopped by hand (``virsh net-destroy``) is runtime drift.

The network's XML is parsed into a small frozen value (``virtxml.NetworkConfig``) and only
the fields the spec sets are compared, in the persistent definition and, while the network
runs, in the live one. DHCP static hosts and ranges are changed in place (``virNetworkUpdate``,
persistent and live), without restarting the network. A change of mode, bridge or address
redefines the persistent network at once, but restarting the running network would cut off
its guests: that is blocked, naming them, while running domains use it. A network is deleted
only for ``state: absent`` (with ``--allow-destroy``), and never while running domains use it.

Domains depend on their networks: the kind draws network(host) -> domain for every domain whose
interface names the network and that may run on that host (``edges``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.checks import Finding
from kvmstate.errors import RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, DriftClass, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.spec import Spec, VirtualNetwork, is_valid_name
from kvmstate.spec.models import _DHCP_NAME_RE
from kvmstate.virtxml import DhcpHostConfig, NetworkConfig, dhcp_host_xml, dhcp_range_xml

#: libvirt runs dnsmasq for a network with an address (DHCP and DNS; seen on libvirt 9.0: an
#: isolated network with an address and no DHCP does not start without it either)
DNSMASQ = prereq.Requirement(
    "dnsmasq", "command", "dnsmasq-base", "dnsmasq", "libvirt networks with an address"
)

# fields whose change needs the running network restarted (the rest is changed in place)
RESTART_FIELDS = frozenset({"mode", "bridge", "address", "dhcp"})


@dataclass(frozen=True)
class NetworkObs:
    config: NetworkConfig  # the persistent definition
    live: NetworkConfig | None  # the running one (None: not active)
    active: bool
    autostart: bool
    persistent: bool
    # running domains on the network: read only when a change would cut them off
    users: tuple[str, ...] = ()
    # bridge mode: does the host bridge exist (None: not a bridge network)
    bridge_present: bool | None = None


def _hosts_of(n: VirtualNetwork) -> frozenset[DhcpHostConfig]:
    if n.dhcp is None:
        return frozenset()
    return frozenset(DhcpHostConfig(h.mac.lower(), h.ip, h.name) for h in n.dhcp.hosts)


def _show_hosts(hosts: Iterable[DhcpHostConfig]) -> list[str]:
    return [
        f"{h.mac}={h.ip}{f' ({h.name})' if h.name else ''}"
        for h in sorted(hosts, key=lambda h: (_ip_key(h.ip), h.mac))
    ]


def _ip_key(ip: str) -> int:
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return -1


def _show_ranges(ranges: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{s}-{e}" for s, e in ranges]


def compare(n: VirtualNetwork, have: NetworkConfig, drift: DriftClass) -> list[FieldDiff]:
    """The fields the spec sets that ``have`` does not match. Pure."""
    out: list[FieldDiff] = []
    if have.mode != n.mode:
        out.append(diff("mode", have.mode, n.mode, drift))
    if n.bridge is not None and have.bridge != n.bridge:
        out.append(diff("bridge", have.bridge, n.bridge, drift))
    if n.address is not None and have.address != n.address:
        out.append(diff("address", have.address, n.address, drift))
    if n.dhcp is not None:
        if not have.dhcp:
            out.append(diff("dhcp", False, True, drift))
            return out
        if n.dhcp.range is not None:
            want = ((n.dhcp.range.start, n.dhcp.range.end),)
            if have.dhcp_ranges != want:
                out.append(
                    diff(
                        "dhcp.range",
                        _show_ranges(have.dhcp_ranges),
                        _show_ranges(want),
                        drift,
                    )
                )
        if have.dhcp_hosts != _hosts_of(n):
            out.append(
                diff("dhcp.hosts", _show_hosts(have.dhcp_hosts), _show_hosts(_hosts_of(n)), drift)
            )
    return out


def dhcp_edits(n: VirtualNetwork, have: NetworkConfig) -> list[virt.DhcpEdit]:
    """The ``virNetworkUpdate`` edits that make ``have``'s DHCP hosts and range the spec's
    (deletions first, so a MAC that moves to another IP is deleted, then added). Pure."""
    if n.dhcp is None or not have.dhcp:
        return []
    want = _hosts_of(n)
    edits = [
        virt.DhcpEdit("delete", "host", dhcp_host_xml(h))
        for h in sorted(have.dhcp_hosts - want, key=lambda h: (h.mac, h.ip))
    ]
    edits += [
        virt.DhcpEdit("add", "host", dhcp_host_xml(h))
        for h in sorted(want - have.dhcp_hosts, key=lambda h: (h.mac, h.ip))
    ]
    if n.dhcp.range is not None:
        r = (n.dhcp.range.start, n.dhcp.range.end)
        if have.dhcp_ranges != (r,):
            edits = [
                virt.DhcpEdit("delete", "range", dhcp_range_xml(*old))
                for old in have.dhcp_ranges
                if old != r
            ] + edits
            if r not in have.dhcp_ranges:
                edits.append(virt.DhcpEdit("add", "range", dhcp_range_xml(*r)))
    return edits


def desired(n: VirtualNetwork, have: NetworkConfig | None) -> NetworkConfig:
    """The definition to write: the spec's fields, and what the spec leaves unset kept from
    ``have`` (the bridge name libvirt picked, a DHCP the spec does not manage). Pure."""
    if n.mode == "bridge":
        return NetworkConfig("bridge", n.bridge)
    keep = have if have is not None and have.mode != "bridge" else None
    bridge = n.bridge or (keep.bridge if keep else None)
    address = n.address or (keep.address if keep else None)
    if n.dhcp is not None:
        if n.dhcp.range is not None:
            ranges: tuple[tuple[str, str], ...] = ((n.dhcp.range.start, n.dhcp.range.end),)
        else:
            ranges = keep.dhcp_ranges if keep else ()
        return NetworkConfig(n.mode, bridge, address, True, ranges, _hosts_of(n))
    if keep is not None and address == keep.address:
        return NetworkConfig(n.mode, bridge, address, keep.dhcp, keep.dhcp_ranges, keep.dhcp_hosts)
    return NetworkConfig(n.mode, bridge, address)


def _restart(diffs: Iterable[FieldDiff]) -> list[str]:
    return sorted({d.field for d in diffs if d.field in RESTART_FIELDS})


class NetworkResource(Resource[NetworkObs]):
    kind = "network"
    section = "networks"
    section_model = spec_models.VirtualNetwork
    docs = (
        DocSection(
            "networks.NAME",
            spec_models.VirtualNetwork,
            "A libvirt network on each listed host: NAT (with DHCP), isolated, or a host "
            "bridge. A domain interface names it with `network: NAME`.",
        ),
        DocSection(
            "networks.NAME.dhcp",
            spec_models.NetworkDhcp,
            "DHCP on the network's address (libvirt's dnsmasq); changed without a restart.",
        ),
        DocSection(
            "networks.NAME.dhcp.range",
            spec_models.DhcpRange,
            "The addresses DHCP hands out.",
        ),
        DocSection(
            "networks.NAME.dhcp.hosts[]",
            spec_models.DhcpHost,
            "A static lease: this MAC always gets this IP (and host name).",
        ),
    )
    requires = (prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD, DNSMASQ)
    uses_libvirt = True

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_networks(invs, out, existing)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        self.n: VirtualNetwork = spec.networks[name]
        super().__init__(spec, name, host or self.n.hosts[0])
        self.h: str = host or self.n.hosts[0]

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[NetworkResource]:
        return [cls(spec, name, h) for name, n in spec.networks.items() for h in n.hosts]

    @property
    def absent(self) -> bool:
        return self.n.state == "absent"

    def needs(self) -> dict[str, frozenset[prereq.Requirement]]:
        need = {prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD}
        if not self.absent and self.n.mode != "bridge" and self.n.address is not None:
            need.add(DNSMASQ)
        return {self.h: frozenset(need)}

    @classmethod
    def edges(
        cls, resources: Mapping[ResourceId, Resource[Any]]
    ) -> Iterable[tuple[ResourceId, ResourceId]]:
        # a domain stands on the networks its interfaces name, on every host it may run on
        nets: dict[tuple[str, str | None], ResourceId] = {
            (r.name, r.id.host): rid for rid, r in resources.items() if isinstance(r, cls)
        }
        for rid, r in resources.items():
            if rid.kind != "domain" or rid.name not in r.spec.domains:
                continue
            d = r.spec.domains[rid.name]
            for nic in d.interfaces:
                for h in d.allowed_hosts() if nic.network is not None else ():
                    net = nets.get((nic.network or "", h))
                    if net is not None:
                        yield net, rid

    @classmethod
    def check(cls, spec: Any) -> Iterable[Finding]:
        yield from _check(spec)

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        if self.n.mode == "bridge" and not self.absent:
            return [(self.h, hostfacts.BRIDGES)]
        return []

    async def observe(self, ctx: RunContext) -> NetworkObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        st = await lv.run(virt.observe_network, conn, self.name)
        if st is None:
            return None
        present = None
        if self.n.mode == "bridge" and not self.absent and self.n.bridge is not None:
            present = self.n.bridge in await ctx.facts(self.h).get(hostfacts.BRIDGES)
        users: tuple[str, ...] = ()
        restart = st.live is not None and _restart(compare(self.n, st.live, "runtime"))
        if st.active and (self.absent or restart):
            users = tuple(await lv.run(virt.network_users, conn, self.name))
        return NetworkObs(
            st.config, st.live, st.active, st.autostart, st.persistent, users, present
        )

    def _what(self) -> str:
        n = self.n
        if n.mode == "bridge":
            return f"bridge network {self.name} on host bridge {n.bridge}"
        where = f" {n.address}" if n.address else ""
        dhcp = ""
        if n.dhcp is not None:
            r = n.dhcp.range
            dhcp = f", DHCP {r.start}-{r.end}" if r else ", DHCP"
            if n.dhcp.hosts:
                dhcp += f" + {len(n.dhcp.hosts)} static"
        br = f" on {n.bridge}" if n.bridge else ""
        return f"{n.mode} network {self.name}{br}{where}{dhcp}"

    def diff(self, observed: NetworkObs | None) -> Change:
        if self.absent:
            if observed is None:
                return self.noop(f"network {self.name} is not defined on {self.h}")
            ch = self.change(Action.DELETE, [diff("defined", True, False)], "state: absent")
            if observed.users:
                return ch.with_blocked(
                    f"network {self.name} on {self.h} is in use by running domains "
                    f"{', '.join(observed.users)}: stop or move them first"
                )
            return ch
        if observed is None:
            return self.change(
                Action.CREATE,
                [diff("defined", None, self.n.mode), diff("active", None, True, "runtime")],
                f"{self._what()} on {self.h}",
            )
        ch = self._update(observed)
        if not ch.is_noop and observed.bridge_present is False:
            return ch.with_blocked(self._no_bridge())
        return ch

    def _no_bridge(self) -> str:
        return (
            f"host bridge {self.n.bridge} does not exist on {self.h}: kvmstate does not create "
            "host bridges; create it (e.g. in /etc/network/interfaces) first"
        )

    def _update(self, o: NetworkObs) -> Change:
        n = self.n
        diffs = compare(n, o.config, "config")
        if not o.persistent:
            diffs.append(diff("persistent", False, True))
        if o.live is not None:
            seen = {d.field for d in diffs}
            diffs += [d for d in compare(n, o.live, "runtime") if d.field not in seen]
        if o.persistent and o.autostart != n.autostart:
            diffs.append(diff("autostart", o.autostart, n.autostart))
        if not o.active:
            diffs.append(diff("active", False, True, "runtime"))
        if not diffs:
            note = ""
            if o.bridge_present is False:
                note = f"; but {self._no_bridge()}"
            return self.noop(
                f"{self._what()} active on {self.h}{' (autostart)' if o.autostart else ''}{note}"
            )
        ch = self.change(Action.UPDATE, diffs, f"network {self.name} on {self.h}")
        restart = _restart(compare(n, o.live, "runtime")) if o.live is not None else []
        if restart and o.users:
            return ch.with_blocked(
                f"network {self.name} on {self.h}: changing {', '.join(restart)} restarts the "
                f"network, which would cut off running domains {', '.join(o.users)}; "
                "stop or move them first"
            )
        return ch

    async def apply(
        self, change: Change, observed: NetworkObs | None, ctx: RunContext
    ) -> NetworkObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        n, cur = self.n, observed
        if self.absent:
            if cur is not None:
                if cur.users:
                    raise RefusedError(f"network {self.name}: in use by {', '.join(cur.users)}")
                self.log.info("%s: destroying and undefining network %s", self.h, self.name)
                await lv.run(virt.undefine_network, conn, self.name)
            return await self.observe(ctx)
        if cur is None:
            await self._check_bridge(ctx)
            self.log.info("%s: defining %s", self.h, self._what())
            await lv.run(virt.define_network, conn, self.name, desired(n, None))
            self.log.info("%s: starting network %s", self.h, self.name)
            await lv.run(virt.start_network, conn, self.name)
            self.log.info("%s: network %s autostart=%s", self.h, self.name, n.autostart)
            await lv.run(virt.set_network_autostart, conn, self.name, n.autostart)
            return await self.observe(ctx)
        # a restart (stop, define, start: the definition is written while the network is
        # stopped, so the start uses it) when the running network must change its mode,
        # bridge or address; DHCP is edited in place, persistent and live
        restart = _restart(compare(n, cur.live, "runtime")) if cur.live is not None else []
        if restart:
            if cur.users:
                raise RefusedError(
                    f"network {self.name}: restart refused, in use by {', '.join(cur.users)}"
                )
            self.log.info(
                "%s: stopping network %s to change %s", self.h, self.name, ", ".join(restart)
            )
            await lv.run(virt.stop_network, conn, self.name)
        if _restart(compare(n, cur.config, "config")) or not cur.persistent:
            self.log.info("%s: redefining network %s: %s", self.h, self.name, self._what())
            base = cur.live if cur.live is not None and not cur.persistent else cur.config
            await lv.run(virt.define_network, conn, self.name, desired(n, base))
        else:
            await self._edit(ctx, conn, dhcp_edits(n, cur.config), live=False)
        if restart or not cur.active:
            self.log.info("%s: starting network %s", self.h, self.name)
            await lv.run(virt.start_network, conn, self.name)
            await self._reattach(ctx, conn)
        elif cur.live is not None:
            await self._edit(ctx, conn, dhcp_edits(n, cur.live), live=True)
        if not cur.persistent or cur.autostart != n.autostart:
            self.log.info("%s: network %s autostart=%s", self.h, self.name, n.autostart)
            await lv.run(virt.set_network_autostart, conn, self.name, n.autostart)
        return await self.observe(ctx)

    async def _reattach(self, ctx: RunContext, conn: Any) -> None:
        """Put the running guests' interfaces back on the network's new bridge: libvirt 9.0
        does not when a network is started again under running guests (seen on the lab: after
        `virsh net-destroy` and `net-start`, the guest's vnetN stays off the bridge, and the
        guest off the network)."""
        bridge, taps = await ctx.libvirt(self.h).run(virt.network_taps, conn, self.name)
        if bridge is None:
            return
        for tap in taps:
            self.log.info("%s: %s back on bridge %s (network %s)", self.h, tap, bridge, self.name)
            await ctx.shell(self.h).run(["ip", "link", "set", "dev", tap, "master", bridge, "up"])

    async def _check_bridge(self, ctx: RunContext) -> None:
        """A bridge network needs its host bridge: libvirt starts the network without it (and
        fails only when a guest starts), so this is checked, fresh, before defining it."""
        if self.n.mode != "bridge" or self.n.bridge is None:
            return
        ctx.invalidate(self.h)
        if self.n.bridge not in await ctx.facts(self.h).get(hostfacts.BRIDGES):
            raise RefusedError(self._no_bridge())

    async def _edit(
        self, ctx: RunContext, conn: Any, edits: list[virt.DhcpEdit], *, live: bool
    ) -> None:
        if not edits:
            return
        lv = ctx.libvirt(self.h)
        for e in edits:
            self.log.info(
                "%s: network %s %s DHCP %s %s",
                self.h,
                self.name,
                "live" if live else "persistent",
                e.command,
                e.xml,
            )
        await lv.run(virt.update_network_dhcp, conn, self.name, edits, live)


# --- spec cross-checks --------------------------------------------------------------------------


def _check(spec: Spec) -> Iterator[Finding]:
    hosts = spec.hosts
    bridges: dict[tuple[str, str], str] = {}
    subnets: dict[str, list[tuple[ipaddress.IPv4Network, str]]] = {}
    for name, n in spec.networks.items():
        seen: set[str] = set()
        for i, h in enumerate(n.hosts):
            if h not in hosts:
                known = ", ".join(sorted(hosts)) or "none defined"
                yield (
                    ("networks", name, "hosts", i),
                    f"unknown host {h!r} (defined: {known})",
                    "error",
                )
            if h in seen:
                yield ("networks", name, "hosts", i), f"host {h!r} is listed twice", "error"
            seen.add(h)
            if n.state == "absent":
                continue
            if n.bridge is not None and n.mode != "bridge":
                other = bridges.setdefault((h, n.bridge), name)
                if other != name:
                    yield (
                        ("networks", name, "bridge"),
                        f"bridge {n.bridge!r} on host {h!r} is already the bridge of network "
                        f"{other!r}",
                        "error",
                    )
            if n.address is not None:
                net = ipaddress.IPv4Interface(n.address).network
                for other_net, other in subnets.get(h, []):
                    if net.overlaps(other_net):
                        yield (
                            ("networks", name, "address"),
                            f"{net} overlaps network {other!r} ({other_net}) on host {h!r}",
                            "error",
                        )
                subnets.setdefault(h, []).append((net, name))
    for dname, d in spec.domains.items():
        if d.state == "absent":
            continue
        for i, nic in enumerate(d.interfaces):
            vn = spec.networks.get(nic.network) if nic.network else None
            if vn is None:  # not managed here (libvirt's own default, say): nothing to check
                continue
            loc = ("domains", dname, "interfaces", i, "network")
            if vn.state == "absent":
                yield loc, f"network {nic.network!r} is state: absent", "error"
                continue
            lacking = [h for h in d.allowed_hosts() if h not in vn.hosts]
            if lacking:
                yield (
                    loc,
                    f"network {nic.network!r} is not on {', '.join(map(repr, lacking))}, where "
                    f"domain {dname!r} may run; add to networks.{nic.network}.hosts",
                    "error",
                )


__all__ = ["DNSMASQ", "NetworkObs", "NetworkResource", "compare", "desired", "dhcp_edits"]


# --- import: what hosts have -> spec entries ------------------------------------------------------

_DHCP_NAME = re.compile(_DHCP_NAME_RE)


def _network_entry(st: virt.NetworkState) -> tuple[dict[str, Any] | None, str, list[str]]:
    """The spec entry of one host's network (without ``hosts``), or None and why not; and
    what was left out of it (notes)."""
    c = st.config
    if not st.persistent:
        return None, "transient (not defined persistently)", []
    if not st.active:
        return None, "not active (the spec would start it)", []
    if c.mode not in ("nat", "isolated", "bridge"):
        return None, f"forward mode {c.mode!r} (nat, isolated or bridge only)", []
    if c.mode == "bridge":
        if not c.bridge:
            return None, "a bridge network without a bridge", []
        return {"mode": "bridge", "bridge": c.bridge, "autostart": st.autostart}, "", []
    if c.address is not None and "/" not in c.address:
        return None, f"address {c.address} without a prefix", []
    if c.mode == "nat" and c.address is None:
        return None, "a NAT network without an IPv4 address", []
    entry: dict[str, Any] = {"mode": c.mode}
    if c.bridge:
        entry["bridge"] = c.bridge
    if c.address:
        entry["address"] = c.address
    left: list[str] = []
    if c.dhcp:
        hosts_ok = all(
            h.mac and h.ip and (h.name is None or _DHCP_NAME.match(h.name)) for h in c.dhcp_hosts
        )
        if not hosts_ok:
            left.append("its DHCP (a static host without a MAC, an IP or a usable name)")
        elif len(c.dhcp_ranges) > 1:
            left.append(f"its DHCP ({len(c.dhcp_ranges)} ranges; the spec holds one)")
        else:
            dhcp: dict[str, Any] = {}
            if c.dhcp_ranges:
                start, end = c.dhcp_ranges[0]
                dhcp["range"] = {"start": start, "end": end}
            if c.dhcp_hosts:
                dhcp["hosts"] = [
                    {"mac": h.mac, "ip": h.ip, **({"name": h.name} if h.name else {})}
                    for h in sorted(c.dhcp_hosts, key=lambda h: (_ip_key(h.ip), h.mac))
                ]
            entry["dhcp"] = dhcp
    entry["autostart"] = st.autostart
    return entry, "", left


def import_networks(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    """One entry per network name, on every host that has it defined alike; a network that
    differs between hosts is left out and named (the spec has one definition per name)."""
    found: dict[str, list[tuple[str, dict[str, Any], list[str]]]] = {}
    for inv in invs:
        for net in inv.networks:
            if net.name in existing.names("networks"):
                continue
            what = f"network {net.name}"
            if not is_valid_name(net.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            entry, why, left = _network_entry(net.state)
            if entry is None:
                out.skip(inv.host, what, why)
                continue
            found.setdefault(net.name, []).append((inv.host, entry, left))
    for name, seen in found.items():
        first = seen[0][1]
        differ = [h for h, e, _ in seen if e != first]
        if differ:
            out.notes.append(
                f"network {name} is defined differently on "
                f"{', '.join(h for h, _, _ in seen)}: left out (one spec entry "
                "is one definition on every host it lists); declare it by hand"
            )
            continue
        hosts = [h for h, _, _ in seen]
        out.data["networks"][name] = {"mode": first["mode"], "hosts": hosts} | first
        for h, _, left in seen:
            for what in left:
                out.notes.append(f"{h}: network {name}: left out {what}")
