"""`kvmstate fence HOST SPEC`: power a dead host off with its fence agent and wait until the
agent reports it off; or, with ``--confirm-off``, record that a person made sure it is off.
Either way it is refused while HOST answers over SSH, and journaled; the next apply then
restarts HOST's HA domains elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
from dataclasses import dataclass

from rich.console import Console

from kvmstate.cli import wiring
from kvmstate.cli.exits import EXIT_ERROR, EXIT_OK
from kvmstate.cli.parser import typed
from kvmstate.errors import KvmstateError


@dataclass(frozen=True)
class FenceArgs:
    host: str
    spec: str
    confirm_off: bool
    auto_approve: bool


def cmd_fence(ns: argparse.Namespace, out: Console, err: Console) -> int:
    from kvmstate.ops import journal
    from kvmstate.resources.liveness import FenceRecord, Liveness, stamp
    from kvmstate.transport.real import RealTransports

    args = typed(FenceArgs, ns)
    loaded = wiring.load(args.spec)
    spec = loaded.spec
    if args.host not in spec.hosts:
        raise KvmstateError(f"{args.host}: not a host of {args.spec} ({', '.join(spec.hosts)})")
    host = spec.hosts[args.host]
    if not args.confirm_off and host.fence is None:
        raise KvmstateError(
            f"{args.host} has no fence agent (hosts.{args.host}.fence in {args.spec}); once you "
            f"made sure it is off: kvmstate fence {args.host} {args.spec} --confirm-off"
        )
    ledger = wiring.fence_ledger(loaded)

    async def run() -> FenceRecord:
        transports = RealTransports(spec)
        try:
            live = Liveness(spec, transports, ledger)
            why = await live.probe(args.host)
            if why is None:
                raise KvmstateError(
                    f"{args.host} answers over SSH: it is not off; nothing is fenced or recorded"
                )
            err.print(f"{args.host} does not answer: {why}", markup=False)
            if args.confirm_off:
                who = f"{getpass.getuser()}@{os.uname().nodename}"
                record = FenceRecord(args.host, str(host.address), "person", stamp(), who)
                ledger.put(record)
                return record
            program = host.fence.program if host.fence else "?"
            question = f"Power {args.host} off with its fence agent {program}?"
            if not args.auto_approve and not _ask(err, question):
                raise KvmstateError("not confirmed: nothing done")
            return await live.fence(args.host)
        finally:
            await transports.close()

    try:
        record = asyncio.run(run())
    except KvmstateError as e:
        err.print(f"error: {e}", style="red", markup=False)
        return EXIT_ERROR
    journal.note(
        {
            "event": "fence",
            "host": args.host,
            "how": record.how,
            "detail": record.detail,
            "outcome": "fenced",
        },
        spec_path=args.spec,
    )
    out.print(f"{args.host}: {record.describe()}", markup=False)
    out.print(
        f"The next `kvmstate apply {args.spec}` restarts its HA domains on other hosts.",
        markup=False,
    )
    return EXIT_OK


def _ask(err: Console, question: str) -> bool:
    if not err.is_terminal:
        raise KvmstateError("not a terminal: pass --auto-approve to fence without asking")
    return err.input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
