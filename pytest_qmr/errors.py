"""The one base class of every error pytest-qmr raises on purpose.

A :class:`QmrError` is a message for the user, not a bug: ``str(err)`` is ONE line naming the
file, the field and the value at fault. The pytest plugin and the ``qmr`` CLI print it as that
line (no traceback); any other exception is a real bug and keeps its traceback. Each stage
subclasses it (``SuiteError``, ``BaselineError``, ``ModelError``, ``DataError``, ...), also
deriving from the builtin its callers historically caught (``ValueError``, ``RuntimeError``).
Messages pass through :func:`pytest_qmr.redact.redact` before they are shown.
"""

from __future__ import annotations


class QmrError(Exception):
    """An error raised on purpose; ``str(err)`` is one line for the user."""

    def __str__(self) -> str:
        from .redact import redact

        return redact(" ".join(super().__str__().split()))


class TaskError(QmrError, ValueError):
    """A benchmark ``task`` that no task folder defines."""
