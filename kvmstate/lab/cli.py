"""``kvmstate lab ...``: the local multi-host KVM lab."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvmstate.lab.config import DEFAULT_DIR
from kvmstate.lab.proc import LabError

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmstate lab",
        # shown as written, like the examples: lines within 78 columns
        description="A real multi-host KVM cluster on this machine (namespaces, sshd,\n"
        "libvirtd, btrfs, NFS), for trying specs and for the real tests.",
        epilog="examples (as root):\n"
        "  kvmstate lab install\n"
        "  kvmstate lab up --kvm-hosts 3\n"
        "  kvmstate lab shell kvm-1 virsh list --all\n"
        "  kvmstate lab status --json\n"
        "  kvmstate lab crash kvm-1        # a power loss (`lab boot kvm-1`: back)\n"
        "  kvmstate lab power kvm-1 status # the fence agent: exit 0 ON, 2 OFF\n"
        "  kvmstate lab down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"lab directory ({DEFAULT_DIR})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="bring the lab up (tears down a previous/crashed one first)")
    up.add_argument("--kvm-hosts", type=int, default=2, metavar="N", help="KVM hosts (>= 2)")
    up.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="lab directory")
    for name, text in (
        ("down", "stop everything the lab started"),
        ("install", "install Debian packages and the guest kernel + initramfs"),
        ("selftest", "check SSH, libvirt, NFS and a live migration on the running lab"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="lab directory")
    st = sub.add_parser("status", help="show the lab's hosts and daemons")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="lab directory")
    sh = sub.add_parser("shell", help="run CMD (or a shell) inside a lab host, as ssh would")
    sh.add_argument("host")
    sh.add_argument("cmd", nargs=argparse.REMAINDER)
    for name, text in (
        ("crash", "power loss of a KVM host: all its processes SIGKILLed, its link down"),
        ("boot", "boot a crashed KVM host (its libvirt state and autostart flags kept)"),
        ("isolate", "network partition: the host's link down, its processes alive"),
        ("reconnect", "end a partition: the host's link up again"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("host")
        sp.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="lab directory")
    pw = sub.add_parser(
        "power",
        help="the lab's fence agent: status (exit 0 ON, 2 OFF), off (= crash), on (= boot)",
    )
    pw.add_argument("host")
    pw.add_argument("action", choices=("status", "off", "on", "reboot"))
    pw.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="lab directory")
    gc = sub.add_parser("guest-counter", help="print a lab guest's latest counter value")
    gc.add_argument("domain")
    gc.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the guest to print a counter (it boots in ~5 s)",
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    from kvmstate.ui.console import make_console

    console = make_console()  # 80 columns when not a terminal, like kvmstate's own output
    err = make_console(stderr=True)
    try:
        return _dispatch(args, console)
    except LabError as exc:
        err.print(f"[bold red]kvmstate lab {args.command}:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def _require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise LabError("must run as root (the lab uses namespaces, mounts and loop devices)")


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    from kvmstate.lab.lab import Lab

    cmd = args.command
    if cmd == "power":
        from kvmstate.lab.power import fence

        return fence(args.dir, args.host, args.action)
    if cmd == "status" and args.json:
        lab = Lab(args.dir)
        print(json.dumps(lab.status(), indent=2))
        return 0
    _require_root(cmd)
    if cmd == "install":
        from kvmstate.lab.install import install

        install(Lab(args.dir).cfg)
        console.print("[green]lab install: done[/]")
        return 0
    if cmd == "up":
        lab = Lab(args.dir, kvm_hosts=args.kvm_hosts)
        elapsed = lab.up()
        console.print(f"[green]lab up[/] in {elapsed:.1f} s: spec {lab.cfg.spec}")
        _print_status(console, lab.status())
        return 0
    lab = Lab(args.dir)
    if cmd == "down":
        elapsed = lab.down()
        for what in lab.forced:
            console.print(f"[yellow]lab down: had to kill {what}[/] (it ignored SIGTERM)")
        console.print(f"[green]lab down[/] in {elapsed:.1f} s: no lab process is left")
        return 0
    if cmd == "status":
        _print_status(console, lab.status())
        return 0
    if cmd == "crash":
        n = lab.crash(args.host)
        if n == 0:
            console.print(f"lab crash: {args.host} is already off")
        else:
            console.print(f"[green]lab crash[/]: {args.host} lost power ({n} processes killed)")
        return 0
    if cmd == "boot":
        was = lab.power_state(args.host)
        for warning in lab.boot(args.host):
            console.print(f"[yellow]lab boot: {warning}[/]")
        done = "booted" if was == "off" else f"already on ({was})"
        console.print(f"[green]lab boot[/]: {args.host} {done}")
        return 0
    if cmd in ("isolate", "reconnect"):
        getattr(lab, cmd)(args.host)
        console.print(f"[green]lab {cmd}[/]: {args.host} is {lab.power_state(args.host)}")
        return 0
    if cmd == "shell":
        h = lab.host(args.host)
        lab.require_on(h.name)
        from kvmstate.lab.hosts import HOST_ENV
        from kvmstate.lab.netns import host_argv

        argv = args.cmd or ["/bin/bash", "-l"]
        if args.cmd and len(args.cmd) == 1 and " " in args.cmd[0]:
            argv = ["/bin/sh", "-c", args.cmd[0]]  # one string: like `ssh HOST 'a b'`
        if not h.netns_path.exists():
            raise LabError(f"lab host {h.name} is not up (run `kvmstate lab up`)")
        full = host_argv(h, argv, wd="/root")
        os.execvpe(full[0], full, {**os.environ, **HOST_ENV})  # noqa: S606 (argv list)
    if cmd == "selftest":
        from kvmstate.lab.selftest import selftest

        result = selftest(lab, console=console)
        return 0 if result.ok else 1
    if cmd == "guest-counter":
        import time

        deadline = time.monotonic() + args.wait
        while True:
            try:
                value = lab.guest_reading(args.domain)
            except LabError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
                continue
            host = lab.guest_host(args.domain)
            boot = f" boot {value.boot}" if value.boot else ""
            print(f"{args.domain} on {host}: counter {value.value}{boot}")
            return 0
    raise LabError(f"unknown command {cmd}")


def _print_status(console: Console, status: dict[str, object]) -> None:
    from kvmstate.ui.layout import Hanging

    table = Table(title=f"kvmstate lab in {status['dir']}: {'up' if status['up'] else 'down'}")
    table.add_column("host", overflow="fold")  # long names fold rather than end in "…"
    table.add_column("role")
    table.add_column("address", overflow="fold")
    table.add_column("daemons", overflow="fold")
    hosts = status["hosts"]
    assert isinstance(hosts, list)
    for h in hosts:
        daemons = ", ".join(
            f"{d['name']}({d['pid']}{'' if d['alive'] else ' dead'})" for d in h["daemons"]
        )
        role = h["role"]  # a host that is not simply on says so: "kvm, off", "kvm, isolated"
        if h.get("power", "on") != "on":
            role = f"{role}, [bold]{h['power']}[/]"
        table.add_row(h["name"], role, h["address"], daemons or "-")
    console.print(table)
    console.print(Hanging(f"spec: {status['spec']}  ssh: ssh -F {status['ssh_config']} HOST"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
