"""Libvirt XML built from the typed spec and parsed back into small frozen values.

Pure (no ``libvirt`` import): raw XML is never compared, only these parsed fields. The XML
comes from the local libvirt daemon we talk to, so the stdlib parser is acceptable (S314).
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from kvmstate.spec import Cpu, Domain

NS = "https://kvmstate.dev/xmlns/1"
ET.register_namespace("kvmstate", NS)


def parse_xml(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML from libvirt, not from users


def _text(root: ET.Element, path: str) -> str | None:
    el = root.find(path)
    return el.text if el is not None and el.text is not None else None


def pool_xml(name: str, path: str) -> str:
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "target"), "path").text = path
    return ET.tostring(root, encoding="unicode")


def parse_pool_path(xml: str) -> str:
    return _text(parse_xml(xml), "target/path") or ""


@dataclass(frozen=True)
class VolumeState:
    path: str
    format: str | None
    capacity: int
    backing: str | None = None  # the qcow2 backing file (a linked clone's base), if any


def volume_xml(
    name: str,
    fmt: str,
    capacity: int,
    backing: tuple[str, str] | None = None,
    allocation: int | None = None,
) -> str:
    """A volume definition; ``backing``: (path, format) of the base of a qcow2 overlay;
    ``allocation``: bytes to allocate now (0: sparse; default: libvirt's, the capacity)."""
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity)
    if allocation is not None:
        ET.SubElement(root, "allocation", unit="bytes").text = str(allocation)
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", type=fmt)
    if backing is not None:
        store = ET.SubElement(root, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", type=backing[1])
    return ET.tostring(root, encoding="unicode")


def parse_volume_xml(xml: str) -> VolumeState:
    root = parse_xml(xml)
    fmt = root.find("target/format")
    return VolumeState(
        _text(root, "target/path") or "",
        fmt.get("type") if fmt is not None else None,
        int(_text(root, "capacity") or 0),
        _text(root, "backingStore/path"),
    )


@dataclass(frozen=True)
class DiskConfig:
    path: str
    format: str | None
    bus: str | None
    cache: str | None
    target: str | None


@dataclass(frozen=True)
class NicConfig:
    kind: str  # bridge | network
    source: str
    model: str | None
    mac: str | None


@dataclass(frozen=True)
class CdromConfig:
    """A CD-ROM (kvmstate attaches one: the cloud-init seed, read-only)."""

    path: str
    bus: str | None
    target: str | None
    readonly: bool = True


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class CpuConfig:
    """A domain's ``<cpu>``: the mode, the named model, the features with their policies
    (sorted by name). Mode ``baseline`` is kvmstate's and never reaches libvirt: it is
    resolved into a ``custom`` CPU (``resolve_baseline``) before a domain is defined."""

    mode: str
    model: str | None = None
    features: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """For the plan: ``qemu64 (+vmx, -svm)``, ``host-passthrough``."""
        what = self.model if self.model else self.mode
        if not self.features:
            return what
        sign = {"require": "+", "force": "+!", "disable": "-", "forbid": "-!", "optional": "?"}
        return f"{what} ({', '.join(sign.get(p, p + ':') + n for n, p in self.features)})"

    def with_features(self, extra: dict[str, str]) -> CpuConfig:
        merged = dict(self.features) | extra
        return CpuConfig(self.mode, self.model, tuple(sorted(merged.items())))

    def projected(self, want: CpuConfig) -> CpuConfig:
        """This (observed) CPU reduced to the fields ``want`` sets: its model only when
        ``want`` names one, and only the features ``want`` lists (libvirt adds the ones a
        running guest's model implies)."""
        mine = dict(self.features)
        return CpuConfig(
            self.mode,
            self.model if want.model is not None else None,
            tuple((n, mine[n]) for n, _ in want.features if n in mine),
        )


def cpu_config(spec: Cpu | None) -> CpuConfig | None:
    """The spec's CPU (a ``baseline`` one still to be resolved on the hosts)."""
    if spec is None:
        return None
    return CpuConfig(spec.mode, spec.model, tuple(sorted(spec.features.items())))


def cpu_xml(c: CpuConfig) -> str:
    return ET.tostring(_cpu_element(c), encoding="unicode")


def _cpu_element(c: CpuConfig) -> ET.Element:
    if c.mode == "baseline":
        raise ValueError("a baseline CPU must be resolved on the hosts before it is defined")
    el = ET.Element("cpu", mode=c.mode)
    if c.mode == "custom":
        el.set("match", "exact")
    if c.model:
        ET.SubElement(el, "model", fallback="forbid").text = c.model
    for name, policy in c.features:
        ET.SubElement(el, "feature", policy=policy, name=name)
    return el


def parse_cpu(el: ET.Element | None) -> CpuConfig | None:
    """A ``<cpu>`` element (of a domain, of ``baselineHypervisorCPU``'s answer); a host-model
    ``<mode>`` of the domain capabilities reads as the custom CPU it stands for."""
    if el is None:
        return None
    mode = el.get("mode") or ("custom" if el.find("model") is not None else None)
    if el.tag == "mode":  # domcapabilities: <mode name='host-model'><model>..</model>
        mode = "custom"
    if mode is None:
        return None
    model = el.findtext("model")
    feats = sorted((f.get("name", ""), f.get("policy", "require")) for f in el.findall("feature"))
    return CpuConfig(mode, model.strip() if model else None, tuple(feats))


@dataclass(frozen=True)
class DomainConfig:
    """The managed fields of a domain definition (persistent or live)."""

    type: str
    memory_kib: int
    vcpus: int
    firmware: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disks: tuple[DiskConfig, ...] = ()
    nics: tuple[NicConfig, ...] = ()
    serial: tuple[str, str | None] | None = None
    managed: bool = False
    current_kib: int = 0  # currentMemory (the balloon target)
    cdroms: tuple[CdromConfig, ...] = ()
    guest_agent: bool = False  # the QEMU guest agent's virtio channel
    cpu: CpuConfig | None = None  # <cpu>: None when the definition has none (QEMU's default)


def cdrom_target(bus: str, disk_targets: list[str]) -> str:
    """The first free target name for a CD-ROM on ``bus`` (sd? for sata, hdc.. for ide)."""
    names = [f"sd{chr(c)}" for c in range(97, 123)] if bus == "sata" else ["hdc", "hdd", "hda"]
    return next(n for n in names if n not in disk_targets)


def desired_config(
    spec: Domain, disk_paths: list[tuple[str, str]], seed_path: str | None = None
) -> DomainConfig:
    """The managed fields the spec asks for. ``disk_paths``: (path, format) per disk;
    ``seed_path``: the cloud-init seed ISO, attached as a read-only CD-ROM."""
    disks = []
    for i, (d, (path, fmt)) in enumerate(zip(spec.disks, disk_paths, strict=True)):
        prefix = {"virtio": "vd", "ide": "hd"}.get(d.bus, "sd")
        disks.append(DiskConfig(path, fmt, d.bus, d.cache, d.target or f"{prefix}{chr(97 + i)}"))
    nics = tuple(
        NicConfig("bridge" if n.bridge else "network", n.bridge or n.network or "", n.model, n.mac)
        for n in spec.interfaces
    )
    boot = spec.boot
    serial = (spec.serial.type, spec.serial.path) if spec.serial else None
    cdroms: tuple[CdromConfig, ...] = ()
    if seed_path is not None and spec.cloud_init is not None:
        bus = spec.cloud_init.bus
        target = cdrom_target(bus, [d.target or "" for d in disks])
        cdroms = (CdromConfig(seed_path, bus, target, True),)
    return DomainConfig(
        spec.type,
        spec.memory // 1024,
        spec.vcpus,
        boot.firmware if boot else None,
        boot.kernel if boot else None,
        boot.initrd if boot else None,
        boot.cmdline if boot else None,
        tuple(disks),
        nics,
        serial,
        True,
        spec.memory // 1024,
        cdroms,
        spec.guest_agent,
        cpu_config(spec.cpu),
    )


def build_domain_xml(name: str, c: DomainConfig) -> str:
    root = ET.Element("domain", type=c.type)
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "metadata"), f"{{{NS}}}managed")
    ET.SubElement(root, "memory", unit="KiB").text = str(c.memory_kib)
    ET.SubElement(root, "currentMemory", unit="KiB").text = str(c.current_kib or c.memory_kib)
    ET.SubElement(root, "vcpu").text = str(c.vcpus)
    os_el = ET.SubElement(root, "os")
    if c.firmware == "uefi":
        os_el.set("firmware", "efi")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    if c.kernel:
        for tag, value in (("kernel", c.kernel), ("initrd", c.initrd), ("cmdline", c.cmdline)):
            if value:
                ET.SubElement(os_el, tag).text = value
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    if c.cpu is not None:
        root.append(_cpu_element(c.cpu))
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    for tag, value in (
        ("on_poweroff", "destroy"),
        ("on_reboot", "restart"),
        ("on_crash", "destroy"),
    ):
        ET.SubElement(root, tag).text = value
    devices = ET.SubElement(root, "devices")
    for d in c.disks:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d.format or "raw", cache=d.cache or "none")
        ET.SubElement(disk, "source", file=d.path)
        ET.SubElement(disk, "target", dev=d.target or "vda", bus=d.bus or "virtio")
    for cd in c.cdroms:
        disk = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=cd.path)
        ET.SubElement(disk, "target", dev=cd.target or "sda", bus=cd.bus or "sata")
        if cd.readonly:
            ET.SubElement(disk, "readonly")
    for n in c.nics:
        nic = ET.SubElement(devices, "interface", type=n.kind)
        if n.mac:
            ET.SubElement(nic, "mac", address=n.mac)
        ET.SubElement(nic, "source", {n.kind: n.source})
        if n.model:
            ET.SubElement(nic, "model", type=n.model)
    if c.serial:
        kind, path = c.serial
        for tag in ("serial", "console"):
            el = ET.SubElement(devices, tag, type=kind)
            if path:
                ET.SubElement(el, "source", path=path)
            ET.SubElement(el, "target", port="0")
    if c.guest_agent:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    return ET.tostring(root, encoding="unicode")


def _kib(el: ET.Element | None) -> int:
    if el is None or el.text is None:
        return 0
    factor = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "m": 1024, "mib": 1024}
    factor.update({"g": 1024**2, "gib": 1024**2})
    return int(int(el.text) * factor.get(el.get("unit", "KiB").lower(), 1))


def parse_domain_xml(xml: str) -> DomainConfig:
    root = parse_xml(xml)
    os_el = root.find("os")
    firmware = None
    if os_el is not None:
        fw = os_el.get("firmware") or ("efi" if os_el.find("loader") is not None else None)
        firmware = "uefi" if fw == "efi" else ("bios" if os_el.find("kernel") is None else None)
    disks = []
    for d in root.findall("devices/disk[@device='disk']"):
        drv, src, tgt = d.find("driver"), d.find("source"), d.find("target")
        disks.append(
            DiskConfig(
                (src.get("file") or src.get("dev") or "") if src is not None else "",
                drv.get("type") if drv is not None else None,
                tgt.get("bus") if tgt is not None else None,
                drv.get("cache", "default") if drv is not None else None,
                tgt.get("dev") if tgt is not None else None,
            )
        )
    cdroms = []
    for d in root.findall("devices/disk[@device='cdrom']"):
        src, tgt = d.find("source"), d.find("target")
        cdroms.append(
            CdromConfig(
                (src.get("file") or "") if src is not None else "",
                tgt.get("bus") if tgt is not None else None,
                tgt.get("dev") if tgt is not None else None,
                d.find("readonly") is not None,
            )
        )
    agent = any(
        t.get("name") == GUEST_AGENT_CHANNEL for t in root.findall("devices/channel/target")
    )
    nics = []
    for n in root.findall("devices/interface"):
        kind = n.get("type", "")
        src, model, mac = n.find("source"), n.find("model"), n.find("mac")
        nics.append(
            NicConfig(
                kind,
                (src.get(kind) or "") if src is not None else "",
                model.get("type") if model is not None else None,
                mac.get("address") if mac is not None else None,
            )
        )
    serial_el = root.find("devices/serial")
    serial = None
    if serial_el is not None:
        src = serial_el.find("source")
        path = src.get("path") if src is not None and serial_el.get("type") == "file" else None
        serial = (serial_el.get("type", "pty"), path)
    vcpu = root.find("vcpu")
    vcpus = int(vcpu.get("current") or vcpu.text or 0) if vcpu is not None else 0
    return DomainConfig(
        root.get("type", ""),
        _kib(root.find("memory")),
        vcpus,
        firmware,
        _text(root, "os/kernel"),
        _text(root, "os/initrd"),
        _text(root, "os/cmdline"),
        tuple(disks),
        tuple(nics),
        serial,
        root.find(f"metadata/{{{NS}}}managed") is not None,
        _kib(root.find("currentMemory")) or _kib(root.find("memory")),
        tuple(cdroms),
        agent,
        _domain_cpu(root.find("cpu")),
    )


def _domain_cpu(el: ET.Element | None) -> CpuConfig | None:
    """A domain's CPU; a ``<cpu>`` that only sets topology or NUMA is no CPU model."""
    cpu = parse_cpu(el)
    if cpu is None or (cpu.mode == "custom" and cpu.model is None and not cpu.features):
        return None
    return cpu


# --- networks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DhcpHostConfig:
    mac: str  # lower case, as libvirt prints it
    ip: str
    name: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """The managed fields of a libvirt network definition (persistent or live).

    ``mode`` is ``nat``, ``isolated`` (no ``<forward>``), ``bridge``, or another forward mode
    as libvirt names it (``route``, ``open``, ``hostdev``...). ``address`` is the first IPv4
    ``<ip>`` as ``A.B.C.D/PREFIX``; ``dhcp_ranges`` and ``dhcp_hosts`` are that ``<ip>``'s."""

    mode: str
    bridge: str | None = None
    address: str | None = None
    dhcp: bool = False
    dhcp_ranges: tuple[tuple[str, str], ...] = ()
    dhcp_hosts: frozenset[DhcpHostConfig] = frozenset()


def _prefix(ip: ET.Element) -> int | None:
    if ip.get("prefix") is not None:
        return int(ip.get("prefix") or 0)
    mask = ip.get("netmask")
    if mask is None:
        return None
    return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen


def parse_network_xml(xml: str) -> NetworkConfig:
    root = parse_xml(xml)
    if root.tag != "network":
        raise ValueError(f"not a network definition: <{root.tag}>")
    fwd = root.find("forward")
    mode = "isolated" if fwd is None else fwd.get("mode", "nat")
    br = root.find("bridge")
    bridge = br.get("name") if br is not None else None
    address = None
    dhcp = False
    ranges: list[tuple[str, str]] = []
    hosts: set[DhcpHostConfig] = set()
    for ip in root.findall("ip"):
        fam = ip.get("family", "ipv4")
        addr = ip.get("address")
        if fam != "ipv4" or addr is None or ":" in addr:
            continue
        prefix = _prefix(ip)
        address = f"{addr}/{prefix}" if prefix is not None else addr
        dh = ip.find("dhcp")
        if dh is not None:
            dhcp = True
            for r in dh.findall("range"):
                ranges.append((r.get("start", ""), r.get("end", "")))
            for h in dh.findall("host"):
                hosts.add(
                    DhcpHostConfig((h.get("mac") or "").lower(), h.get("ip", ""), h.get("name"))
                )
        break  # the first IPv4 address is the one kvmstate manages
    return NetworkConfig(mode, bridge, address, dhcp, tuple(ranges), frozenset(hosts))


def dhcp_host_xml(h: DhcpHostConfig) -> str:
    attrs = {"mac": h.mac, **({"name": h.name} if h.name else {}), "ip": h.ip}
    return ET.tostring(ET.Element("host", attrs), encoding="unicode")


def dhcp_range_xml(start: str, end: str) -> str:
    return ET.tostring(ET.Element("range", start=start, end=end), encoding="unicode")


def network_xml(name: str, c: NetworkConfig, uuid: str | None = None) -> str:
    """A network definition with the fields of ``c`` (libvirt adds its defaults: uuid, MAC,
    STP, a ``virbrN`` name when ``c.bridge`` is None)."""
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    if uuid:
        ET.SubElement(root, "uuid").text = uuid
    if c.mode != "isolated":
        ET.SubElement(root, "forward", mode=c.mode)
    if c.bridge:
        ET.SubElement(root, "bridge", name=c.bridge)
    if c.address:
        iface = ipaddress.IPv4Interface(c.address)
        ip = ET.SubElement(root, "ip", address=str(iface.ip), prefix=str(iface.network.prefixlen))
        if c.dhcp:
            dh = ET.SubElement(ip, "dhcp")
            for start, end in c.dhcp_ranges:
                dh.append(parse_xml(dhcp_range_xml(start, end)))
            for h in sorted(c.dhcp_hosts, key=lambda h: (h.mac, h.ip)):
                dh.append(parse_xml(dhcp_host_xml(h)))
    return ET.tostring(root, encoding="unicode")
