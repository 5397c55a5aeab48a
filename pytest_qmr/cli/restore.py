"""``qmr restore`` commands (moving here from the stage module)."""

from ..restore import add_cli

__all__ = ["add_cli"]
