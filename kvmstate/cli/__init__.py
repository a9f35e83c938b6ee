"""The ``kvmstate`` command (console script ``kvmstate.cli:main``; ``python -m kvmstate.cli``).

  parser.py      the argument parser, and typed views of what it parsed
  app.py         entry point: logging, consoles, one command, errors -> exit codes (exits.py)
  wiring.py      what commands share: load the spec, build the engine, run locks, spinner
  plan.py        plan, show              apply.py      apply, evacuate
  drift.py       drift                   importing.py  import
  specfile.py    validate, graph, schema completion.py completion
  console.py     consoles, JSON, a closed stdout
  layout.py      wrapping with a hanging indent (every line of human output)
  views.py       plans, reports, the observed-state table, spec problems
  progress.py    apply's live progress (and JSON event lines)

Decisions about the cluster that are not about showing it live in :mod:`kvmstate.ops`.
"""

from kvmstate.cli.app import main

__all__ = ["main"]
