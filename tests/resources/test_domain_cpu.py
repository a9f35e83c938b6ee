"""The domain's ``cpu:``: validation, the XML round trip, the diff table (pure, no host)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fakelab import LAB_SPEC, find, make_spec

from kvmstate.errors import SpecError
from kvmstate.model import Action
from kvmstate.resources import REGISTRY
from kvmstate.resources.domain import DomainObs, config_diffs
from kvmstate.virtxml import CpuConfig, build_domain_xml, parse_cpu, parse_domain_xml, parse_xml

NESTED = "    cpu: {model: qemu64, features: {vmx: require, svm: disable}}\n"


def with_cpu(block: str, text: str = LAB_SPEC) -> str:
    return text.replace("    vcpus: 1\n", "    vcpus: 1\n" + block)


def test_cpu_modes_validate() -> None:
    d = make_spec(with_cpu(NESTED)).domains["guest"]
    assert d.cpu is not None and d.cpu.mode == "custom" and d.cpu.model == "qemu64"
    assert d.cpu.features == {"vmx": "require", "svm": "disable"}
    base = make_spec(with_cpu("    cpu: {mode: baseline}\n")).domains["guest"]
    assert base.cpu is not None and base.cpu.mode == "baseline"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("    cpu: {mode: host-passthrough}\n", "needs hardware virtualization (type: kvm)"),
        ("    cpu: {mode: host-model}\n", "a TCG guest (type: qemu)"),
        ("    cpu: {mode: custom}\n", "cpu mode custom needs a model"),
        ("    cpu: {mode: baseline, model: qemu64}\n", "cpu mode baseline takes no model"),
        ("    cpu: {model: qemu64, features: {vmx: maybe}}\n", "force"),
        ("    cpu: {model: qemu64, features: {'VMX X': require}}\n", "pattern"),
    ],
)
def test_cpu_errors_name_the_problem(block: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        REGISTRY.parse(with_cpu(block))
    assert message in str(info.value)


def test_host_cpu_modes_are_fine_for_kvm() -> None:
    text = with_cpu("    cpu: {mode: host-passthrough}\n").replace("type: qemu", "type: kvm")
    d = make_spec(text).domains["guest"]
    assert d.cpu is not None and d.cpu.mode == "host-passthrough"


def test_cpu_xml_round_trip() -> None:
    want = find(make_spec(with_cpu(NESTED)), "domain").want  # type: ignore[attr-defined]
    assert want.cpu == CpuConfig("custom", "qemu64", (("svm", "disable"), ("vmx", "require")))
    xml = build_domain_xml("guest", want)
    cpu = parse_xml(xml).find("cpu")
    assert cpu is not None and cpu.get("mode") == "custom"
    assert parse_domain_xml(xml) == want
    # no cpu: none in the XML, none parsed back; a topology-only <cpu> is no CPU model
    plain = find(make_spec(), "domain").want  # type: ignore[attr-defined]
    assert plain.cpu is None and parse_xml(build_domain_xml("guest", plain)).find("cpu") is None
    topo = "<cpu><topology sockets='1' cores='2' threads='1'/></cpu>"
    assert (
        parse_domain_xml(
            build_domain_xml("g", plain).replace("<features>", topo + "<features>")
        ).cpu
        is None
    )


def test_a_baseline_cpu_is_never_defined_unresolved() -> None:
    want = find(make_spec(with_cpu("    cpu: {mode: baseline}\n")), "domain").want  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="resolved"):
        build_domain_xml("guest", want)


# libvirt 9.0's answer to baselineHypervisorCPU (TCG, an AMD host), shortened
BASELINE = """<cpu mode='custom' match='exact'>
  <model fallback='forbid'>EPYC</model>
  <vendor>AMD</vendor>
  <feature policy='require' name='x2apic'/>
  <feature policy='disable' name='rdseed'/>
</cpu>"""


def test_parse_the_baseline_answer() -> None:
    cpu = parse_cpu(parse_xml(BASELINE))
    assert cpu == CpuConfig("custom", "EPYC", (("rdseed", "disable"), ("x2apic", "require")))
    assert cpu.with_features({"rdseed": "require"}).describe() == "EPYC (+rdseed, +x2apic)"
    # a host-model <mode> of the domain capabilities reads as the CPU it stands for
    mode = "<mode name='host-model' supported='yes'><model fallback='forbid'>EPYC</model></mode>"
    assert parse_cpu(parse_xml(mode)) == CpuConfig("custom", "EPYC")


# a running guest's definition as libvirt rewrites it: check, fallback, more features
LIVE_CPU = """<cpu mode='custom' match='exact' check='full'>
  <model fallback='forbid'>qemu64</model>
  <feature policy='require' name='vmx'/>
  <feature policy='disable' name='svm'/>
  <feature policy='require' name='hypervisor'/>
  <feature policy='disable' name='lahf_lm'/>
</cpu>"""


def test_diff_compares_only_what_the_spec_sets() -> None:
    spec = make_spec(with_cpu(NESTED))
    res = find(spec, "domain")
    want = res.want  # type: ignore[attr-defined]
    xml = build_domain_xml("guest", want)
    live = parse_domain_xml(xml.replace(parse_xml_cpu(xml), LIVE_CPU))
    assert config_diffs(want, live, spec.domains["guest"], "pending-restart") == []
    # the spec's feature changed in the definition by hand: config drift, named
    edited = parse_domain_xml(
        xml.replace('policy="require" name="vmx"', 'policy="disable" name="vmx"')
    )
    diffs = config_diffs(want, edited, spec.domains["guest"], "config")
    assert [(d.field, d.before, d.after, d.drift) for d in diffs] == [
        ("cpu", "qemu64 (-svm, -vmx)", "qemu64 (-svm, +vmx)", "config")
    ]


def parse_xml_cpu(xml: str) -> str:
    start = xml.index("<cpu")
    return xml[start : xml.index("</cpu>") + len("</cpu>")]


def test_cpu_change_of_a_running_guest_is_pending_restart() -> None:
    spec = make_spec(with_cpu(NESTED))
    res = find(spec, "domain")
    old = replace(res.want, cpu=CpuConfig("custom", "Nehalem"))  # type: ignore[attr-defined]
    # the persistent config has the new CPU already; the running guest has the old one
    obs = DomainObs("kvm-1", res.want, old, "running", False)  # type: ignore[attr-defined]
    change = res.diff(obs)
    assert change.is_noop and "pending restart" in change.reason
    assert [(d.field, d.before, d.after, d.drift) for d in change.pending] == [
        ("cpu", "Nehalem", "qemu64 (-svm, +vmx)", "pending-restart")
    ]
    # the config still has the old CPU: an UPDATE (redefine), then pending restart
    change = res.diff(DomainObs("kvm-1", old, old, "running", False))
    assert change.action is Action.UPDATE
    assert [(d.field, d.drift) for d in change.diffs] == [("cpu", "config")]


def test_plan_of_a_new_domain_says_which_cpu() -> None:
    res = find(make_spec(with_cpu(NESTED)), "domain")
    change = res.diff(None)
    assert ("cpu", None, "qemu64 (-svm, +vmx)") in [
        (d.field, d.before, d.after) for d in change.diffs
    ]
    base = find(
        make_spec(with_cpu("    cpu: {mode: baseline, features: {vmx: require}}\n")), "domain"
    )
    after = {d.field: d.after for d in base.diff(None).diffs}["cpu"]
    assert after == "baseline of kvm-1, kvm-2 (+vmx), from their CPUs at plan"
