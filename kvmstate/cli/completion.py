"""`kvmstate completion`: shell completion scripts generated from the argparse parser
(commands, their options, and spec files as arguments)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rich.console import Console

from kvmstate.cli.exits import EXIT_OK
from kvmstate.cli.parser import build_parser, typed

WIDTH = 80  # the scripts are read too: every line fits 80 columns


def _fill(words: list[str], first: int, indent: int, end: str = "", width: int = WIDTH) -> str:
    """``words`` joined by spaces, in lines within ``width`` columns: the first line starts
    at column ``first``, the others at ``indent``, and the last leaves room for ``end``."""
    lines: list[list[str]] = [[]]
    col = first
    for word in words:
        need = len(word) + (1 if lines[-1] else 0)
        if lines[-1] and col + need > width:
            lines.append([])
            col, need = indent, len(word)
        lines[-1].append(word)
        col += need
    if len(lines[-1]) > 1 and col + len(end) > width:
        lines.append([lines[-1].pop()])
    return ("\n" + " " * indent).join(" ".join(line) for line in lines)


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for action in parser._actions:  # argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                opts = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
                out[name] = sorted(set(opts))
    return out


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    if shell == "bash":
        cases = "\n".join(
            f'        {name}) opts="{_fill(opts, len(name) + 16, 12, end=chr(34) + " ;;")}" ;;'
            for name, opts in sorted(commands.items())
        )
        names = _fill(sorted(commands), 20, 8, end='"')
        return f"""# kvmstate bash completion: eval "$(kvmstate completion bash)"
_kvmstate() {{
    local cur cmd opts
    local commands="{names}"
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    cmd="${{COMP_WORDS[1]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        return
    fi
    case "$cmd" in
{cases}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -X '!*.y*ml' -- "$cur") $(compgen -d -- "$cur"))
    fi
}}
complete -o filenames -F _kvmstate kvmstate
"""
    lines = [
        "#compdef kvmstate",
        '# kvmstate zsh completion: eval "$(kvmstate completion zsh)"',
        "_kvmstate() {",
        "  local -a commands",
        "  commands=(",
    ]
    for name in sorted(commands):
        lines.append(f"    '{name}'")
    lines += [
        "  )",
        "  if (( CURRENT == 2 )); then",
        "    _describe 'command' commands",
        "  else",
        "    case $words[2] in",
    ]
    for name, opts in sorted(commands.items()):
        head = f"      {name}) _arguments '*:spec:_files -g \"*.y(a|)ml\"'"
        if not opts:
            lines.append(f"{head} ;;")
            continue
        # each line but the last ends in " \\": leave room for it
        flags = _fill([repr(o) for o in opts], 10, 10, end=" ;;", width=WIDTH - 2)
        flags = flags.replace("\n", " \\\n")
        lines += [f"{head} \\", f"          {flags} ;;"]
    lines += ["    esac", "  fi", "}", "compdef _kvmstate kvmstate", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class CompletionArgs:
    shell: str


def cmd_completion(ns: argparse.Namespace, out: Console, err: Console) -> int:
    args = typed(CompletionArgs, ns)
    sys.stdout.write(script(args.shell, build_parser()))
    return EXIT_OK
