"""The ``kvmstate`` argument parser, and typed views of what it parsed.

Each command reads its arguments through a small frozen dataclass whose fields are the
parser's ``dest`` names (:func:`typed`), not by attribute access on a ``Namespace``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ArgsT = TypeVar("ArgsT", bound="DataclassInstance")

# examples are shown as written (RawDescriptionHelpFormatter): keep every line within 78
# columns, argparse's width on an 80-column terminal (tests/cli/test_width.py checks)
EPILOG = {
    "validate": "example:\n  kvmstate validate specs/seed.yaml",
    "plan": (
        "examples:\n  kvmstate plan specs/lab.yaml\n"
        "  kvmstate plan specs/seed.yaml --assume-empty   # review it, contact no host\n"
        "  kvmstate plan specs/lab.yaml --json\n"
        "  kvmstate plan specs/lab.yaml --host-down kvm-2   # what if kvm-2 died?\n\n"
        "exit status: 0 no changes, 2 changes pending, 1 error"
    ),
    "apply": (
        "examples:\n  kvmstate apply specs/lab.yaml\n"
        "  kvmstate apply specs/lab-migrated.yaml --auto-approve   # live-migrates\n\n"
        "exit status: 0 converged, 1 error or not converged"
    ),
    "drift": (
        "examples:\n  kvmstate drift specs/lab.yaml\n"
        "  kvmstate drift specs/lab.yaml --json\n\n"
        "  # in a crontab: every 10 minutes, with metrics for node_exporter\n"
        "  PROM=/var/lib/node_exporter/kvmstate.prom\n"
        "  */10 * * * * kvmstate drift /etc/kvmstate/cluster.yaml --textfile $PROM\n\n"
        "exit status: 0 no drift (prints nothing), 2 drift, 1 error (cannot tell)"
    ),
    "import": (
        "examples:\n"
        "  kvmstate import --spec hosts.yaml kvm-1 kvm-2 storage -o cluster.yaml\n"
        "  kvmstate import kvm-1=192.0.2.11 --identity ~/.ssh/id_ed25519 > kvm-1.yaml\n\n"
        "HOST is a host of --spec, NAME=ADDRESS, or an address. Read-only: nothing is\n"
        "changed on the hosts. What cannot be expressed exactly is left out and named\n"
        "in comments at the top of the output; `kvmstate plan` of the result shows no\n"
        "changes for what was imported."
    ),
    "evacuate": (
        "examples:\n  kvmstate evacuate kvm-1 specs/lab.yaml\n"
        "  kvmstate evacuate kvm-1 specs/lab.yaml --auto-approve --json\n\n"
        "exit status: 0 converged, 1 error or not converged"
    ),
    "fence": (
        "examples:\n  kvmstate fence kvm-1 cluster.yaml   # runs hosts.kvm-1.fence\n"
        "  kvmstate fence kvm-1 cluster.yaml --confirm-off   # you switched it off\n\n"
        "Refused while HOST answers over SSH. Journaled. The next apply restarts the\n"
        "HA domains HOST had on other hosts.\n\n"
        "exit status: 0 HOST is fenced, 1 error (nothing recorded)"
    ),
    "show": (
        "examples:\n  kvmstate show specs/lab.yaml\n  kvmstate show specs/lab.yaml --json\n\n"
        "exit status: 0 every resource observed, 1 error (some could not be)"
    ),
    "completion": (
        "examples:\n"
        '  eval "$(kvmstate completion bash)"   # in ~/.bashrc\n'
        '  eval "$(kvmstate completion zsh)"    # in ~/.zshrc, after compinit'
    ),
    "graph": (
        "examples:\n  kvmstate graph specs/seed.yaml\n"
        "  kvmstate graph specs/seed.yaml --format dot | dot -Tsvg > g.svg"
    ),
    "schema": "example:\n  kvmstate schema > kvmstate.schema.json   # for editors and CI",
}


def typed(cls: type[ArgsT], ns: argparse.Namespace) -> ArgsT:
    """The parsed values ``cls`` names (each field is a ``dest`` of the command's parser)."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class GlobalArgs:
    """What every command accepts (before or after its name)."""

    command: str | None
    verbose: int
    no_color: bool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmstate",
        description="Run a KVM cluster from one desired-state file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kvmstate {_version()}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--no-color", action="store_true", help="plain output (also: NO_COLOR=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # also accepted after the command; SUPPRESS keeps the value given before it
        sp.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more"
        )
        sp.add_argument(
            "--no-color", action="store_true", default=argparse.SUPPRESS, help="plain output"
        )
        return sp

    v = cmd("validate", "check a spec file; contacts no host")
    v.add_argument("spec")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    pl = cmd("plan", "show what apply would change")
    pl.add_argument("spec")
    pl.add_argument(
        "--assume-empty",
        action="store_true",
        help="plan as if nothing existed yet; contacts no host",
    )
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="accepted for Terraform users: plan always exits 0/2/1",
    )
    pl.add_argument("--allow-destroy", action="store_true", help="show deletions as allowed")
    pl.add_argument(
        "--host-down",
        action="append",
        metavar="HOST",
        help="what if HOST died now: which domains restart where, which cannot (contacts "
        "no HOST, changes nothing, exits 0); repeatable",
    )

    ap = cmd("apply", "change the cluster to match the spec")
    ap.add_argument("spec")
    ap.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    ap.add_argument(
        "--allow-destroy",
        action="store_true",
        help="allow deleting what the spec marks state: absent",
    )
    ap.add_argument(
        "--adopt",
        action="store_true",
        help="take over existing domains that kvmstate did not create",
    )
    ap.add_argument(
        "--restart-pending",
        action="store_true",
        help="restart running domains whose changes wait for a restart (graceful shutdown, "
        "then start)",
    )
    ap.add_argument("--json", action="store_true", help="events and the report as JSON lines")
    ap.add_argument("--max-rounds", type=int, default=3, help="convergence rounds (default 3)")
    ap.add_argument(
        "--lock-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another run's lock (default: fail at once)",
    )

    dr = cmd("drift", "detect drift, for cron: quiet and exit 0 when the cluster matches")
    dr.add_argument("spec")
    dr.add_argument("--json", action="store_true", help="one entry per drifted field")
    dr.add_argument("--textfile", metavar="PATH", help="write Prometheus textfile metrics")
    dr.add_argument("--lock-timeout", type=float, default=60.0, metavar="SECONDS")

    ev = cmd("evacuate", "move every domain off a host (apply with drain: true on it)")
    ev.add_argument("host")
    ev.add_argument("spec")
    ev.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    ev.add_argument("--json", action="store_true", help="events and the report as JSON lines")
    ev.set_defaults(
        allow_destroy=False, adopt=False, restart_pending=False, max_rounds=3, lock_timeout=0.0
    )

    fe = cmd("fence", "power a dead host off with its fence agent, or record that it is off")
    fe.add_argument("host")
    fe.add_argument("spec")
    fe.add_argument(
        "--confirm-off",
        action="store_true",
        help="record that you made sure HOST is powered off (no fence agent is run); its HA "
        "domains may then restart elsewhere",
    )
    fe.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")

    sh = cmd("show", "print the observed state of every resource as a table")
    sh.add_argument("spec")
    sh.add_argument("--json", action="store_true", help="machine-readable output")

    comp = cmd("completion", "print a shell completion script (bash or zsh)")
    comp.add_argument("shell", choices=["bash", "zsh"])

    g = cmd("graph", "print the resource dependency graph")
    g.add_argument("spec")
    g.add_argument("--format", choices=["text", "dot", "mermaid"], default="text")

    im = cmd("import", "write a spec for what already exists on hosts (read-only)")
    im.add_argument("hosts", nargs="+", metavar="HOST", help="NAME, NAME=ADDRESS or ADDRESS")
    im.add_argument("--spec", metavar="FILE", help="take hosts and ssh settings from this spec")
    im.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    im.add_argument("--user", help="ssh user (default: the spec's, or root)")
    im.add_argument("--port", type=int, help="ssh port")
    im.add_argument("--identity", metavar="FILE", help="ssh private key")
    im.add_argument("--known-hosts", metavar="FILE", help="known_hosts file to verify keys")

    cmd("schema", "print the spec's JSON Schema")
    sub.add_parser("lab", help="a local multi-host KVM lab (kvmstate lab --help)", add_help=False)
    return p


def _version() -> str:
    from kvmstate import __version__

    return __version__
