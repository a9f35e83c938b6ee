"""Shell completion scripts generated from the argparse parser (commands, options, and the
resource ids of the spec file on the command line)."""

from __future__ import annotations

import argparse


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
            f'        {name}) opts="{" ".join(opts)}" ;;' for name, opts in sorted(commands.items())
        )
        return f"""# kvmstate bash completion: eval "$(kvmstate completion bash)"
_kvmstate() {{
    local cur cmd opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    cmd="${{COMP_WORDS[1]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(sorted(commands))}" -- "$cur"))
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
        flags = " ".join(repr(o) for o in opts)
        lines.append(f"      {name}) _arguments '*:spec:_files -g \"*.y(a|)ml\"' {flags} ;;")
    lines += ["    esac", "  fi", "}", "compdef _kvmstate kvmstate", ""]
    return "\n".join(lines)
