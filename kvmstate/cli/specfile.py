"""Commands that read only the spec file and contact no host: `validate`, `graph`, `schema`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rich.console import Console

from kvmstate.cli import views, wiring
from kvmstate.cli.exits import EXIT_OK
from kvmstate.cli.parser import typed
from kvmstate.ui.console import to_json
from kvmstate.ui.layout import wrapped


@dataclass(frozen=True)
class ValidateArgs:
    spec: str
    json: bool


@dataclass(frozen=True)
class GraphArgs:
    spec: str
    format: str


def cmd_validate(ns: argparse.Namespace, out: Console, err: Console) -> int:
    args = typed(ValidateArgs, ns)
    loaded = wiring.load(args.spec)
    graph = wiring.graph_of(loaded)
    if args.json:
        out.print_json(
            to_json(
                {
                    "valid": True,
                    "file": args.spec,
                    "resources": len(graph),
                    "warnings": [str(w) for w in loaded.warnings],
                }
            )
        )
        return EXIT_OK
    views.problems(err, loaded.warnings)
    spec = loaded.spec
    out.print(
        f"{args.spec}: valid ({len(spec.hosts)} hosts, {len(graph)} resources"
        f"{', ' + str(len(loaded.warnings)) + ' warnings' if loaded.warnings else ''})"
    )
    return EXIT_OK


def cmd_graph(ns: argparse.Namespace, out: Console, err: Console) -> int:
    args = typed(GraphArgs, ns)
    graph = wiring.graph_of(wiring.load(args.spec))
    text = {"dot": graph.to_dot, "mermaid": graph.to_mermaid, "text": graph.to_text}[args.format]()
    if args.format == "text":  # for a person: wrapped to the width; dot and mermaid as they are
        wrapped(out, text, hang=4)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_schema(ns: argparse.Namespace, out: Console, err: Console) -> int:
    from kvmstate.docgen import json_schema

    sys.stdout.write(json_schema())
    return EXIT_OK
