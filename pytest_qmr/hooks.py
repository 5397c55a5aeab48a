"""Hook specifications of pytest-qmr (registered with ``pluginmanager.add_hookspecs``).

Restore is a hook so a project can swap the teacher, the pair variant or the trainer (or skip
Restore for some cells) without patching the plugin; the default implementation lives in the
plugin and calls :mod:`pytest_qmr.restore`.
"""

from __future__ import annotations

import pytest


@pytest.hookspec(firstresult=True)
def pytest_qmr_restore(cell, result, records, context):
    """Restore one cell whose suite asks for it (``restore.when``: ``on-fail`` or ``always``).

    :param cell: the suite cell (:class:`pytest_qmr.suite.Cell`); ``cell.restore`` holds the
        suite's restore settings (teacher, variant, train_problems, train: RestoreConfig fields).
    :param result: its :class:`pytest_qmr.records.CellResult`: gate, ``error_profile`` and outcome set.
    :param records: the quantized model's :class:`pytest_qmr.records.SampleRecord` per evaluated
        item (the cell's evaluation items; pairs must not come from them).
    :param context: a :class:`pytest_qmr.records.CellContext`: the FP model, the baseline, the
        quantized checkpoint paths (dense and compressed) and the cell's record directory. An
        implementation takes only the arguments it names (``def pytest_qmr_restore(cell, result,
        records)`` keeps working).

    Return a :class:`pytest_qmr.restore.RestoreResult` or a dict (stored as ``result.restore``)
    with ``restored_acc`` measured on the same items, or ``None`` to leave the cell unrestored
    and let the next implementation decide (first non-None wins; the built-in one runs last).
    Raise :class:`pytest_qmr.restore.RestoreError` for a one-line failure the cell reports.
    A ``restored_verdict`` of ``pass`` turns the cell to pass only when the suite sets
    ``restore.may_pass``.
    """
