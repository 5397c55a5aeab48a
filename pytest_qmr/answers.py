"""Answer extraction and equivalence: the single place that decides "is this response right".

Every stage (the lm-eval tasks, the gate, the step labeller, the DPO data builder) scores with
these two functions, so a response is judged the same way everywhere. Three answer kinds:

- ``"number"``: GSM8K, MAWPS, SVAMP, qmr_arith. Compared numerically, so "1,000", "1000.0"
  and "$1000" are one answer.
- ``"latex"``: MATH-500, AIME. Compared with math-verify (sympy), so ``5.5``, ``\\frac{11}{2}``
  and ``\\dfrac{11}{2}`` are one answer.
- ``"choice"``: MMLU. A letter A-D.

Both functions are total: garbage in gives ``None`` / ``False``, never an exception, because
one odd generation must not abort a benchmark run.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from fractions import Fraction

from latex2sympy2_extended.math_normalization import extract_boxed_content
from math_verify import parse, verify
from math_verify.errors import TimeoutException

KINDS = ("number", "latex", "choice")
CHOICES = "ABCD"

# Seconds math-verify may spend parsing / comparing one answer before it counts as wrong.
MATH_VERIFY_TIMEOUT = 5

logger = logging.getLogger(__name__)

# "The answer is X", "final answer: X"; X runs to the end of its line.
_ANSWER_CLAUSE = re.compile(r"answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
# A number with optional sign, thousands separators, decimals and a /denominator.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FULL_NUMBER = re.compile(rf"^(?:{_NUMBER.pattern})$")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_NUMERIC = re.compile(r"\\d?frac|\\sqrt|\\pi")
# Letter at the start of an answer clause: "(B)", "B.", "B)", "B"; lower case only in brackets.
_CHOICE_LEAD = re.compile(r"^\W*?(?:\(([A-Da-d])\)|([A-D]))(?![A-Za-z0-9])")
# A bare response that is only a letter, or opens with "B." / "B)" / "(B)".
_CHOICE_BARE = re.compile(r"^\s*(?:\(?([A-D])\)?\.?\s*$|([A-D])[.)]\s|\(([A-Da-d])\))")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}`` (nested braces handled by math-verify's
    own extractor, which also joins adjacent boxes such as ``\\boxed{1}, \\boxed{2}``)."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    content = extract_boxed_content(text, mode="last").strip()
    if content.count("{") > content.count("}"):  # "\boxed{..." cut off by the token limit
        return None
    return content or None


def _last_answer_clause(text: str) -> str | None:
    for match in reversed(list(_ANSWER_CLAUSE.finditer(text))):
        clause = text[match.end():].split("\n", 1)[0].strip()
        if clause:
            return clause
    return None


def _strip_wrappers(s: str) -> str:
    """Remove what surrounds an answer but is not part of it: $...$, \\(...\\), a final period."""
    s = s.strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2]
        if s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        s = s.strip("$").strip()
        if s == before:
            break
    return s


def _clean_number_text(s: str) -> str:
    """Drop currency, units, percent, LaTeX spacing and text wrappers around a number."""
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = _TEXT_MACRO.sub(r" \1 ", s)
    for junk in ("\\!", "\\%", "%", "^\\circ", "^{\\circ}", "\\left", "\\right"):
        s = s.replace(junk, "")
    for space in ("\\,", "\\;", "\\ "):
        s = s.replace(space, " ")
    return _strip_wrappers(s)


def _extract_number(candidate: str) -> str | None:
    s = _clean_number_text(candidate)
    if "=" in s:  # "x = 5", "2 + 3 = 5": the value is after the last '='
        s = s.rsplit("=", 1)[1].strip()
    if _FULL_NUMBER.match(s.replace(" ", "")):
        return s.replace(" ", "").replace(",", "")
    if _LATEX_NUMERIC.search(s):  # \frac{1}{2}: leave it to math-verify in is_equivalent
        return s
    match = _NUMBER.search(s)
    return match.group(0).replace(",", "") if match else None


def _extract_choice(candidate: str, bare: bool = False) -> str | None:
    """A letter at the start of ``candidate``; ``bare`` (a whole response with no answer
    clause) only accepts unmistakable forms, so a sentence opening "A ..." is no answer."""
    s = _TEXT_MACRO.sub(r"\1", _strip_wrappers(candidate))
    match = (_CHOICE_BARE if bare else _CHOICE_LEAD).match(s)
    if match:
        return next(g for g in match.groups() if g).upper()
    return None


def extract_answer(response: str, kind: str) -> str | None:
    """The model's final answer as a string, or None when it gave none.

    Priority follows the prompt format: the last ``\\boxed{}``, else the last
    "The answer is X", else (numbers only) the last number anywhere in the text.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(response, str) or not response.strip():
        return None
    try:
        boxed = _last_boxed(response)
        clause = _last_answer_clause(response)
        if kind == "choice":
            for candidate in (boxed, clause):
                if candidate is not None and (letter := _extract_choice(candidate)):
                    return letter
            return _extract_choice(response, bare=True)
        if kind == "latex":
            for candidate in (boxed, clause):
                if candidate is not None and (answer := _strip_wrappers(candidate)):
                    return answer
            return None
        for candidate in (boxed, clause):
            if candidate is not None and (number := _extract_number(candidate)):
                return number
        numbers = _NUMBER.findall(_clean_number_text(response))
        return numbers[-1].replace(",", "") if numbers else None
    except Exception:  # noqa: BLE001 - one odd response must not abort a run
        logger.debug("answer extraction failed", exc_info=True)
        return None


def _to_fraction(s: str) -> Fraction | None:
    s = _clean_number_text(s).replace(",", "").replace(" ", "")
    if not _FULL_NUMBER.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _decimals(s: str) -> int:
    s = _clean_number_text(s).replace(",", "")
    return len(s.split(".", 1)[1]) if "." in s and "/" not in s else 0


def _numbers_equal(pred: str, gold: str) -> bool | None:
    """Numeric compare; None when either side is not a plain number (then use math-verify)."""
    p, g = _to_fraction(pred), _to_fraction(gold)
    if p is None or g is None:
        return None
    # A gold written with >= 4 decimals (MAWPS "3.33333") is itself rounded: accept a
    # prediction that agrees to the precision the gold was written with.
    abs_tol = 1e-6
    if (k := _decimals(gold)) >= 4:
        abs_tol = max(abs_tol, 0.5 * 10.0**-k + 1e-12)
    return math.isclose(float(p), float(g), rel_tol=1e-9, abs_tol=abs_tol)


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify on both sides; signal-based timeouts only work in the main thread."""
    timeout = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001 - TimeoutException is a BaseException
        logger.debug("math-verify failed on %r vs %r", pred, gold, exc_info=True)
        return False


_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\s|\$|\.$")


def _normalized_latex(s: str) -> str:
    s = _strip_wrappers(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_MACRO.sub(r"\1", s)
    return _LATEX_NOISE.sub("", s)


def is_equivalent(pred: str | None, gold: str, kind: str) -> bool:
    """Whether an extracted prediction is the gold answer; False on anything unparseable."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    try:
        if kind == "choice":
            letter = _extract_choice(pred)
            return letter is not None and letter == _extract_choice(gold)
        if kind == "number":
            equal = _numbers_equal(pred, gold)
            if equal is not None:
                return equal
            return _math_verify_equal(_clean_number_text(pred), _clean_number_text(gold))
        if _math_verify_equal(_strip_wrappers(pred), _strip_wrappers(gold)):
            return True
        norm_pred = _normalized_latex(pred)
        return bool(norm_pred) and norm_pred == _normalized_latex(gold)
    except Exception:  # noqa: BLE001
        logger.debug("equivalence check failed on %r vs %r", pred, gold, exc_info=True)
        return False


def gsm8k_gold(answer_field: str) -> str:
    """The gold number of a GSM8K ``answer`` field: the text after '####', commas removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' line: {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")
