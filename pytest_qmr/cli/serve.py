"""``qmr serve``: the server's own module owns its arguments (it also runs as
``python -m pytest_qmr.engines.serve``)."""

from ..engines.serve import add_cli

__all__ = ["add_cli"]
