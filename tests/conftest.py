"""Shared by every test directory: lets lab tests import ``labkit`` (tests/labkit.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
