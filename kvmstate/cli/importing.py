"""`kvmstate import`: write a spec for what already exists on hosts (read-only)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kvmstate.cli import wiring
from kvmstate.cli.exits import EXIT_OK
from kvmstate.cli.parser import typed
from kvmstate.errors import KvmstateError

if TYPE_CHECKING:
    from kvmstate.importer import Inventory

# the spec's data as YAML gives it, before validation: its values are any YAML value
RawSpec = dict[str, Any]


@dataclass(frozen=True)
class ImportArgs:
    hosts: list[str]
    spec: str | None
    output: str | None
    user: str | None
    port: int | None
    identity: str | None
    known_hosts: str | None


def cmd_import(ns: argparse.Namespace, out: Console, err: Console) -> int:
    from kvmstate import importer
    from kvmstate.localfs import write_atomic
    from kvmstate.resources import REGISTRY
    from kvmstate.spec import Spec
    from kvmstate.transport.real import RealTransports

    args = typed(ImportArgs, ns)
    data, chosen = connection_data(args)
    try:
        conn_spec = Spec.model_validate(data)
    except ValueError as e:
        raise KvmstateError(f"import: bad host or ssh option: {e}") from None

    async def run() -> list[Inventory]:
        transports = RealTransports(conn_spec)
        try:
            with wiring.observing(err, len(chosen)):
                return await importer.gather(transports, chosen)
        finally:
            await transports.close()

    imported = importer.build(asyncio.run(run()), data)
    result = importer.merged(data, imported)
    header = f"kvmstate import of {', '.join(chosen)} ({len(imported.resources())} resources)"
    text = importer.render_yaml(result, imported.notes, header)
    REGISTRY.parse(text, args.output or "<import>")  # raises: never write a failing spec
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    kinds = (
        ", ".join(f"{len(v)} {k if len(v) > 1 else k[:-1]}" for k, v in imported.data.items() if v)
        or "nothing"
    )
    err.print(f"imported {kinds} from {len(chosen)} host(s)", markup=False)
    for note in imported.notes:
        err.print(f"  note: {note}", style="yellow", markup=False)
    return EXIT_OK


def connection_data(args: ImportArgs) -> tuple[RawSpec, dict[str, str]]:
    """The connection spec's data (base spec + hosts and ssh flags) and {host: address}."""
    from kvmstate.spec import is_valid_name

    base: RawSpec = {"version": 1}
    if args.spec:
        wiring.load(args.spec)  # a broken base spec is reported like any other
        base = _raw_yaml(args.spec)
    hosts = dict(base.get("hosts") or {})
    chosen: dict[str, str] = {}
    for item in args.hosts:
        name, sep, address = item.partition("=")
        if not sep:
            if name in hosts:
                address = hosts[name]["address"]
            else:
                address, name = name, name.replace(":", "-")
        if not is_valid_name(name):
            raise KvmstateError(f"import: {name!r} is not a valid host name (use NAME=ADDRESS)")
        if name in hosts and hosts[name]["address"] != address:
            raise KvmstateError(
                f"import: host {name} is {hosts[name]['address']} in {args.spec}, not {address}"
            )
        hosts.setdefault(name, {"address": address})
        chosen[name] = address
    ssh = dict(base.get("ssh") or {})
    for key, value in (("user", args.user), ("port", args.port)):
        if value is not None:
            ssh[key] = value
    for key, path in (("identity", args.identity), ("known_hosts", args.known_hosts)):
        if path is not None:
            ssh[key] = os.path.abspath(os.path.expanduser(path))
    data = {**base, "hosts": hosts}
    if ssh:
        data = {"version": base.get("version", 1), "ssh": ssh, **data}
    return data, chosen


def _raw_yaml(path: str) -> RawSpec:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return dict(data or {})
