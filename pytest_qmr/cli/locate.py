"""``qmr locate`` commands (moving here from the stage module)."""

from ..locate import add_cli

__all__ = ["add_cli"]
