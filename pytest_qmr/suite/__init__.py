"""Suite files (``suites/*.yaml``): parse, validate, expand into cells.

A suite names models, quantizers and benchmarks; every model x quantizer x benchmark
combination is one *cell* (FP cells included).  Everything is validated with pydantic v2
(``extra="forbid"``, strict types), and every problem is reported as ONE line::

    <file>: <dotted.key.path>: <problem> (got <value>)

e.g. ``suites/x.yaml: quantizers[1].bits: must be one of 2, 3, 4, 8 (got 5)``.
No traceback and no pydantic multi-line dump ever reaches the user: :class:`SuiteError`
carries the first problem found.

The package, one module a step: :mod:`.schema` (the pydantic models), :mod:`.load` (YAML and
:func:`load_suite` / :func:`parse_suite`), :mod:`.checks` (the checks across fields, and
:func:`check_references` at collection), :mod:`.messages` (:class:`SuiteError` and the one-line
messages), :mod:`.cells` (:class:`Suite` and :class:`Cell`).  Importing it imports no torch.
"""

from __future__ import annotations

from ..fsutil import DATA_DIR_ENV
from .cells import Cell, Suite
from .checks import check_references
from .load import load_suite, parse_suite
from .messages import SuiteError
from .schema import (WEIGHT_BITS, BenchmarkSpec, Calibration, Generation, LocateSpec, ModelSpec, QuantizerSpec,
                     RestoreSpec, SuiteSpec, Thresholds, ThresholdsOverride)

__all__ = [
    "SuiteError",
    "ModelSpec",
    "Calibration",
    "QuantizerSpec",
    "BenchmarkSpec",
    "Thresholds",
    "ThresholdsOverride",
    "Generation",
    "LocateSpec",
    "RestoreSpec",
    "SuiteSpec",
    "Suite",
    "Cell",
    "load_suite",
    "parse_suite",
    "check_references",
    "WEIGHT_BITS",
    "DATA_DIR_ENV",
]
