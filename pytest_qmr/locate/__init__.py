"""The Locate stage: for each item the FP model solved and the quantized model failed, the first
faulty step of the quantized solution and its error type, decided by an ensemble of judges.

- :mod:`.stage`: the stage itself (regression set, running the judges, the voting policies);
- :mod:`.records`: :class:`LocatedRow`, the record of one judged (or input) row, as in ``located.jsonl``;
- :mod:`.profile`: :class:`ErrorProfile`, the error profile of judged rows, and its thresholds;
- :mod:`.judges`: the judges, one module per built-in judge, registered in
  :data:`pytest_qmr.registry.JUDGES`, and the LLM judges of a judge config file;
- :mod:`.review`: the human review queue (write it, import the filled-in verdicts).

``qmr judge`` and ``qmr review`` are in :mod:`pytest_qmr.cli.locate`.
"""

from .profile import BIN_LABELS, ErrorProfile, check_profile, error_profile, profile_summary, validate_thresholds
from .records import FINAL_STATUSES, LocatedRow
from .review import ReviewError, import_reviews, write_review_queue
from .stage import (POLICIES, ROW_FIELDS, Decision, LocateError, Policy, decide, default_policy, ensemble, locate,
                    locate_cell, output_row, redecide, regression_set, validate_rows)

__all__ = ["BIN_LABELS", "FINAL_STATUSES", "POLICIES", "ROW_FIELDS", "Decision", "ErrorProfile", "LocateError",
           "LocatedRow", "Policy", "ReviewError", "check_profile", "decide", "default_policy", "ensemble",
           "error_profile", "import_reviews", "locate", "locate_cell", "output_row", "profile_summary", "redecide",
           "regression_set", "validate_rows", "validate_thresholds", "write_review_queue"]
