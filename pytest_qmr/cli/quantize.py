"""``qmr quantize`` commands (moving here from the stage module)."""

from ..quantize import add_cli

__all__ = ["add_cli"]
