"""CLI commands of the reports module: registered by transferkit.cli; keep imports here light."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's sub-commands to the transferkit parser (see transferkit.cli._parser)."""
