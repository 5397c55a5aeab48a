"""``qmr report`` commands (moving here from the stage module)."""

from ..report import add_cli

__all__ = ["add_cli"]
