"""Exit codes (stable, for scripts and cron).

- 0: success; for plan/drift: no changes (the cluster matches the spec)
- 1: error: invalid spec, unreachable host, failed apply, refused change
- 2: plan/drift only: changes pending (drift)
"""

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
