"""``python -m kvmstate.cli``: the ``kvmstate`` command."""

import sys

from kvmstate.cli.app import main

sys.exit(main())
