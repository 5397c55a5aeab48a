"""A deterministic arithmetic judge: the first step whose written equality is false.

No model is involved. Each step of a response (see :mod:`pytest_qmr.steps`) goes through one
small pipeline:

1. **normalise** the notation to plain ASCII arithmetic: GSM8K calculator annotations
   ``<<48/2=24>>`` are lifted out and checked on their own; LaTeX ``\\frac{a}{b}``,
   ``\\times``, ``\\cdot``, ``\\div``, ``\\left``/``\\right``, ``\\text{}`` and ``$`` are rewritten;
   ``×``/``÷``/``·``/``−`` become ``* / * -``.
2. **tokenise** into numbers (thousands separators, decimals, a trailing ``%``, mixed numbers
   ``3 1/2``), operators, parentheses, ``=``/``≈``, words and other marks. A number's unit (up
   to four words, compound units such as ``GB/minute`` or ``$3/brownie`` included; a verb or
   conjunction ends it) is dropped, so ``80 GB / 2 GB/minute`` reads ``80 / 2``; ``x``,
   ``times``, ``plus``, ``minus``, ``divided by`` between two operands are operators and
   ``% of`` is a product. Spacing is read as written: ``25 / 1/3`` is 25 ÷ ⅓, a hyphen in
   ``2-slice`` is no minus. Any other word, or a punctuation mark, ends the arithmetic there.
3. **sides**: for every ``=`` the numeric expression that ends right before it and the one that
   starts right after it (so ``a = b = c`` gives ``a = b`` and ``b = c``). A side that holds a
   variable (``x``, ``2x``, ``0900``), a function (``\\sqrt(...)``), two operands with no operator
   between, or that continues through prose to an operator ("25 classmates + his 1 teacher + 1
   = 27") is not checked; nor is a bare number opening a chain ("8 degrees = 2 - 8"), which
   names a quantity rather than claiming a value.
4. **check** each pair with sympy rationals (exact) when at least one side is a computation (a
   bare "2 hours = 120 minutes" is a unit conversion, not arithmetic). A side written as a bare
   number may be rounded or truncated to the digits it shows, but only when the true value
   needs more digits: ``10/3 = 3.33`` and ``100/3 = 33`` hold, ``2.5 + 1.2 = 3.6`` and
   ``10/3 = 3.4`` do not. ``≈`` also allows 1 % relative error. Percentages are read as
   hundredths, or as plain numbers when that is how the whole equality holds
   (``1.2*100 = 120%``). A running total ``2*3 = 6+4 = 10`` is read as the chain it means: the
   link whose right side starts from the left side's value is not a claim ``6 = 10``.

The verdict is "error" (first step with a false equality, reported as ``computational_error``),
"no_error_found" (every checked equality holds; ``checked`` counts them) or "no_verdict" (nothing
checkable was found: the judge does not guess).

As a Locate voter (:class:`RuleJudge`, registered as ``rule``) it only ever reports
``computational_error``; when it finds no false equality it abstains rather than clearing the
response (no evidence about the other six types).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import sympy

from pytest_qmr import steps as steps_mod
from pytest_qmr.registry import JUDGES

from .base import Case, InlineJudge, Vote

RULE = "rule"

# ---------------------------------------------------------------------------------------------
# 1. normalisation

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_UNWRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|boxed)\s*\{([^{}]*)\}")
_POWER = re.compile(r"(?<=[\d)])\s*\*\*\s*(?=[\d(])")
_REPLACE = [
    ("\\left", ""), ("\\right", ""), ("\\times", " * "), ("\\cdot", " * "), ("\\ast", " * "),
    ("\\div", " / "), ("\\approx", " ≈ "), ("\\%", "%"), ("\\$", " "), ("{,}", ","),
    ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\ ", " "), ("\\(", " "), ("\\)", " "),
    ("\\[", " "), ("\\]", " "), ("$", " "), ("×", " * "), ("÷", " / "), ("·", " * "),
    ("⋅", " * "), ("−", "-"), ("–", "-"), ("\u2009", " "), ("\u00a0", " "),
]


def normalise(text: str) -> str:
    """Plain-ASCII arithmetic notation (annotations must already be lifted out)."""
    for _ in range(4):  # nested \frac / \text: innermost first
        new = _UNWRAP.sub(r" \1 ", _FRAC_DIGITS.sub(r"(\1)/(\2)", _FRAC.sub(r"((\1)/(\2))", text)))
        if new == text:
            break
        text = new
    for old, new in _REPLACE:
        text = text.replace(old, new)
    text = _POWER.sub("^", text).replace("**", " ")  # 2**3 is a power; other ** is markdown bold
    return text.replace("{", "(").replace("}", ")")


def lift_annotations(text: str) -> tuple[str, list[str]]:
    """``text`` without its GSM8K ``<<expr=result>>`` annotations, and the annotations."""
    return _ANNOTATION.sub("", text), _ANNOTATION.findall(text)


# ---------------------------------------------------------------------------------------------
# 2. tokens

_TOKEN = re.compile(
    r"(?P<time>(?<!\d)(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?!\d))"
    r"|(?P<num>(?:(?<!\d)\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?(?![\d.]\d)|\.\d+)"
    r"(?P<pct>\s*%)?"
    r"|(?P<cmp>==|<=|>=|!=|=>|≠|≤|≥|<|>)"
    r"|(?P<eq>[=≈])"
    r"|(?P<op>[-+*/^])"
    r"|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<word>\\?[^\W\d_]+(?:['’][^\W\d_]*)?)"
    r"|(?P<sep>\S)"
)
_WORD_OPS = {"x": "*", "times": "*", "plus": "+", "minus": "-", "multiplied": "*", "divided": "/"}
_NOT_VARIABLES = {"a", "I"}  # one-letter English words; any other lone letter is a variable
_UNIT_WORDS = 4
# Verbs and conjunctions end a quantity's description: "100/75 gives the total", "25 oranges is".
_NOT_UNITS = {"is", "are", "was", "were", "be", "equals", "gives", "makes", "and", "or", "but", "so", "then",
              "which", "that", "to", "because", "since", "if", "when", "while"}


@dataclass
class Token:
    kind: str  # num | op | neg | lp | rp | eq | word | unit | var | sep
    text: str
    value: sympy.Rational | None = None
    percent: bool = False
    decimals: int | None = 0  # digits shown after the point; None: an exact fraction ("3 1/2")
    space_before: bool = True

    def is_int(self) -> bool:
        return self.kind == "num" and self.decimals == 0 and not self.percent


def _raw_tokens(text: str) -> list[Token]:
    out: list[Token] = []
    last_end = 0
    for m in _TOKEN.finditer(text):
        kind = "num" if m.lastgroup == "pct" else m.lastgroup
        space = m.start() > last_end or m.start() == 0
        last_end = m.end()
        digits = (m.group("num") or "").replace(",", "")
        if kind == "num" and len(digits) > 1 and digits[0] == "0" and digits[1] != ".":
            # "0900", "18 000", "16,0000": a clock time, a space-grouped or mistyped number. The
            # digits are not a value on their own, so they make the expression around them unknown.
            out.append(Token("var", m.group(0), space_before=space))
        elif kind == "num":
            out.append(Token("num", m.group(0).strip(), sympy.Rational(digits), bool(m.group("pct")),
                             len(digits.split(".")[1]) if "." in digits else 0, space))
        elif kind in ("eq", "op", "lp", "rp", "word"):
            out.append(Token(kind, m.group(0), space_before=space))
            if kind == "word" and len(out) >= 3 and _is_hyphen(out[-3], out[-2], out[-1]):
                out[-2].kind = "sep"  # "2-slice", "1000-foot", "already-stamped": a hyphen, not a minus
        else:  # a clock time "7:50", a comparison, a mark
            out.append(Token("sep", m.group(0), space_before=space))
    return out


def _is_hyphen(before: Token, dash: Token, word: Token) -> bool:
    return (dash.kind == "op" and dash.text == "-" and not dash.space_before and not word.space_before
            and len(word.text) > 1 and before.kind in ("num", "word"))


def _is_operand_end(tok: Token | None) -> bool:
    return tok is not None and tok.kind in ("num", "rp")


def _is_operand_start(tok: Token | None) -> bool:
    return tok is not None and tok.kind in ("num", "lp")


def _resolve_words(raw: list[Token]) -> list[Token]:
    """Words: a number's unit (up to four words after it, compound "GB/minute" included) becomes
    kind "unit"; an operator word between operands ("3 x 4", "25 miles per gallon x 12 gallons",
    "5 times 2", "10 divided by 2", "20% of 50") becomes an operator; a lone letter, or one glued
    to a number ("2x"), is a variable."""
    out: list[Token] = []
    operand: Token | None = None  # the operand the current position follows (through its unit)
    units = 0
    for i, tok in enumerate(raw):
        prev, nxt = (out[-1] if out else None), (raw[i + 1] if i + 1 < len(raw) else None)
        if tok.kind == "word":
            low = tok.text.lower()
            if low == "by" and prev is not None and prev.kind == "op" and prev.text in "*/" and _is_operand_start(nxt):
                continue  # the "by" of "divided by" / "multiplied by"
            if low == "of" and operand is not None and operand.percent and prev is operand and _is_operand_start(nxt):
                tok = Token("op", "*", space_before=tok.space_before)
            elif low in _WORD_OPS and operand is not None and (
                _is_operand_start(nxt) or (nxt is not None and nxt.text == "by")
            ):
                tok = Token("op", _WORD_OPS[low], space_before=tok.space_before)
            elif len(tok.text) == 1 and (tok.text not in _NOT_VARIABLES or (not tok.space_before and prev is operand)):
                tok.kind = "var"
            elif operand is not None and units < _UNIT_WORDS and low not in _NOT_UNITS:
                tok.kind, units = "unit", units + 1
        elif (tok.kind == "op" and tok.text == "/" and operand is not None and not tok.space_before
              and nxt is not None and nxt.kind == "word" and len(nxt.text) > 1 and not nxt.space_before):
            tok.kind = "unit"  # the slash of "GB/minute", "$3/brownie"
        out.append(tok)
        if tok.kind in ("num", "rp"):
            operand, units = tok, 0
        elif tok.kind != "unit":
            operand = None
    return out


def _resolve_signs(toks: list[Token]) -> list[Token]:
    """A '-' glued to the number or parenthesis after it, where no operand precedes it, is a sign."""
    out: list[Token] = []
    for i, tok in enumerate(toks):
        prev, nxt = (out[-1] if out else None), (toks[i + 1] if i + 1 < len(toks) else None)
        if (tok.kind == "op" and tok.text == "-" and nxt is not None and not nxt.space_before
                and (prev is None or prev.kind in ("eq", "op", "lp", "sep"))):
            if nxt.kind == "num":
                nxt.value, nxt.text, nxt.space_before = -nxt.value, "-" + nxt.text, tok.space_before
                continue
            if nxt.kind == "lp":
                tok.kind = "neg"
        out.append(tok)
    return out


def _fraction_at(toks: list[Token], i: int) -> bool:
    """``toks[i:i+3]`` is a glued proper fraction of integers: "1/2" (not "1 / 2")."""
    if i + 2 >= len(toks):
        return False
    num, slash, den = toks[i:i + 3]
    return (num.is_int() and slash.kind == "op" and slash.text == "/" and not slash.space_before
            and den.is_int() and not den.space_before and den.value != 0)


def _resolve_fractions(toks: list[Token]) -> list[Token]:
    """Written fractions: a mixed number "3 1/2" / "3 and 1/2" is one value, and so is a glued
    fraction divided into: "25 / 1/3" is 25 ÷ (1/3) as the spacing says, not (25/1)/3."""
    out: list[Token] = []
    i = 0
    while i < len(toks):
        tok, prev = toks[i], (out[-1] if out else None)
        glue = 1 if tok.kind in ("word", "unit") and tok.text.lower() == "and" else 0
        if (prev is not None and prev.is_int() and _fraction_at(toks, i + glue) and toks[i + glue].space_before
                and 0 < toks[i + glue].value < toks[i + glue + 2].value):
            num, den = toks[i + glue].value, toks[i + glue + 2].value
            sign = 1 if prev.value >= 0 else -1
            prev.value, prev.decimals = prev.value + sign * num / den, None
            prev.text = f"{prev.text} {'and ' if glue else ''}{num}/{den}"
            i += 3 + glue
            continue
        if prev is not None and prev.kind == "op" and prev.text == "/" and _fraction_at(toks, i) and tok.space_before:
            num, den = tok.value, toks[i + 2].value
            out.append(Token("num", f"{num}/{den}", num / den, decimals=None, space_before=True))
            i += 3
            continue
        out.append(tok)
        i += 1
    return out


def tokenize(text: str) -> list[Token]:
    """Tokens of normalised ``text`` (see the module doc): words, signs and fractions resolved."""
    return _resolve_fractions(_resolve_signs(_resolve_words(_raw_tokens(text))))


# ---------------------------------------------------------------------------------------------
# 3. sides of each equality


@dataclass
class Side:
    tokens: list[Token]

    @property
    def text(self) -> str:
        return " ".join(t.text for t in self.tokens).replace("( ", "(").replace(" )", ")")

    @property
    def is_literal(self) -> bool:
        return sum(t.kind == "num" for t in self.tokens) == 1 and not any(t.kind in ("op", "neg") for t in self.tokens)

    @property
    def has_percent(self) -> bool:
        return any(t.percent for t in self.tokens)

    def value(self, percent_scale: sympy.Rational) -> sympy.Rational | None:
        return _Parser(self.tokens, percent_scale).parse()


class _Parser:
    """expr := term (+|- term)* ; term := power (*|/ power)* ; power := unary (^ power)? ;
    unary := neg unary | num | ( expr ). Returns None on anything else, a zero division included."""

    def __init__(self, tokens: list[Token], percent_scale: sympy.Rational):
        self.toks, self.i, self.scale = tokens, 0, percent_scale

    def parse(self):
        try:
            value = self.expr()
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
        if self.i != len(self.toks) or value is None or not value.is_finite:
            return None
        return value

    def peek(self, *ops: str) -> bool:
        return self.i < len(self.toks) and self.toks[self.i].kind == "op" and self.toks[self.i].text in ops

    def expr(self):
        value = self.term()
        while self.peek("+", "-"):
            op = self.toks[self.i].text
            self.i += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self):
        value = self.power()
        while self.peek("*", "/"):
            op = self.toks[self.i].text
            self.i += 1
            rhs = self.power()
            if op == "/" and rhs == 0:
                raise ZeroDivisionError
            value = value * rhs if op == "*" else value / rhs
        return value

    def power(self):
        base = self.unary()
        if self.peek("^"):
            self.i += 1
            exp = self.power()
            if not exp.is_integer or abs(exp) > 64 or (exp < 0 and base == 0):
                raise ValueError("unsupported power")
            return base**exp
        return base

    def unary(self):
        if self.i >= len(self.toks):
            raise ValueError("missing operand")
        tok = self.toks[self.i]
        self.i += 1
        if tok.kind == "neg":
            return -self.unary()
        if tok.kind == "num":
            return tok.value * self.scale if tok.percent else tok.value
        if tok.kind == "lp":
            value = self.expr()
            if self.i >= len(self.toks) or self.toks[self.i].kind != "rp":
                raise ValueError("unbalanced")
            self.i += 1
            return value
        raise ValueError(f"unexpected {tok.text!r}")


def _items(tokens: list[Token]) -> list[Token]:
    """Arithmetic items: units dropped, glued implicit products made explicit, a function call
    ("\\sqrt(16)", "f(3)") made a variable. Words stay, as breaks."""
    items: list[Token] = []
    for i, tok in enumerate(tokens):
        prev = items[-1] if items else None
        if tok.kind == "unit":
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None and nxt.kind in ("num", "lp", "neg", "var"):
                items.append(Token("sep", "<unit>"))  # "5 apples and 3 pears": no operator between
            continue
        if tok.kind == "word" and i + 1 < len(tokens) and tokens[i + 1].kind == "lp" and not tokens[i + 1].space_before:
            tok = Token("var", tok.text)
        elif _is_operand_end(prev) and _is_operand_start(tok) and not tok.space_before:
            items.append(Token("op", "*"))  # 2(3+4), (1+2)(3+4)
        items.append(tok)
    return items


def _side(run: list[Token], outer: int) -> list[Token]:
    """The side an equality's run makes, or [] when it is not one numeric expression. ``outer``
    is the end away from the '=' (0 for a left side, -1 for a right side): a parenthesis opened
    there in prose is dropped, "(16 - 3 - 4 = 9)"; one closed at the '=' end means the side
    reaches back into prose, "12 + 1 (from 1/4 mile) = 13", and is not checkable."""
    side = list(run)
    opener = "lp" if outer == 0 else "rp"

    def excess() -> int:  # unmatched parentheses of the outer kind
        n_lp, n_rp = sum(t.kind == "lp" for t in side), sum(t.kind == "rp" for t in side)
        return n_lp - n_rp if opener == "lp" else n_rp - n_lp

    while side and side[outer].kind == opener and excess() > 0:
        side.pop(outer)
    if excess() != 0:
        return []
    for prev, tok in zip(side, side[1:], strict=False):  # "1/2 (68)", "2 500 kg", "= 8 5% increases": two operands
        if _is_operand_end(prev) and tok.kind in ("num", "lp", "neg"):  # with no operator between
            return []
    return side


_BREAKS = ("sep", "eq", "word")


def _operator_beyond_words(items: list[Token], j: int, step: int) -> bool:
    """Whether, from ``items[j]`` outward, a short run of words (one to three) ends at an operator."""
    words = 0
    while 0 <= j < len(items) and items[j].kind == "word" and words < 3:
        j += step
        words += 1
    return words > 0 and 0 <= j < len(items) and items[j].kind in ("op", "neg")


@dataclass
class Equality:
    left: Side
    right: Side
    approx: bool = False

    @property
    def text(self) -> str:
        return f"{self.left.text} {'≈' if self.approx else '='} {self.right.text}"


def equalities(text: str) -> list[Equality]:
    """Every ``lhs = rhs`` pair in ``text`` whose sides are both purely numeric expressions."""
    items = _items(tokenize(normalise(text)))
    out = []
    for e, tok in enumerate(items):
        if tok.kind != "eq":
            continue
        before, after = [], []
        j = e - 1
        while j >= 0 and items[j].kind not in _BREAKS:
            before.insert(0, items[j])
            j -= 1
        chain_start = j < 0 or items[j].kind != "eq"
        left_open = _operator_beyond_words(items, j, -1)
        j = e + 1
        while j < len(items) and items[j].kind not in _BREAKS:
            after.append(items[j])
            j += 1
        right_open = _operator_beyond_words(items, j, +1)
        left, right = _side(before, 0), _side(after, -1)
        if not left or not right or left_open or right_open or any(t.kind == "var" for t in left + right):
            continue  # "25 classmates + his 1 teacher + 1 = 27": the expression runs on through prose
        equality = Equality(Side(left), Side(right), tok.text == "≈")
        if chain_start and equality.left.is_literal:
            continue  # "Drop 8 degrees = 2 - 8 = -6": a leading bare number labels, it does not claim
        out.append(equality)
    return out


# ---------------------------------------------------------------------------------------------
# 4. checks


@dataclass
class Check:
    expression: str
    holds: bool
    expected: sympy.Rational  # the value of the computed side
    written: sympy.Rational  # the value of the other side


def _close(computed, written_side: Side, written, scale, approx: bool) -> bool:
    """Whether the written side states the computed value: exactly, or, for a bare decimal
    literal, rounded or truncated to the digits it shows (``10/3 = 3.33``, ``100/3 = 33``;
    ``2.5 + 1.2 = 3.6`` is false because 3.7 needs no more digits than 3.6 shows)."""
    if computed == written:
        return True
    if not written_side.is_literal:
        return False
    literal = next(t for t in written_side.tokens if t.kind == "num")
    if literal.decimals is None:  # "3 1/2", "1/3": exact fractions
        return False
    unit = sympy.Rational(1, 10**literal.decimals) * (scale if literal.percent else 1)
    if approx:
        return abs(computed - written) <= max(unit, abs(computed) / 100)
    shown = computed / unit
    if shown.is_integer:  # the computed value has no more digits than the literal shows
        return False
    truncated = sympy.Integer(int(shown)) * unit  # int() truncates toward zero
    return written == truncated or abs(computed - written) <= unit / 2


def _check(eq: Equality) -> Check | None:
    if eq.left.is_literal and eq.right.is_literal:
        return None  # "1 hour = 60 minutes" converts units; there is no arithmetic to check
    scales = [sympy.Rational(1, 100)] + ([sympy.Integer(1)] if eq.left.has_percent or eq.right.has_percent else [])
    result = None
    for scale in scales:
        lv, rv = eq.left.value(scale), eq.right.value(scale)
        if lv is None or rv is None:
            return None
        # the computed side is the one with an operator (the left one when both have)
        computed, written, written_side = (rv, lv, eq.left) if eq.left.is_literal else (lv, rv, eq.right)
        holds = _close(computed, written_side, written, scale, eq.approx)
        if result is None or holds:
            result = Check(eq.text, holds, computed, written)
        if holds:
            break
    return result


def check_text(text: str) -> list[Check]:
    """Check every equality of one piece of text (annotations are checked as written)."""
    visible, annotations = lift_annotations(text)
    checks: list[Check] = []
    for chunk in [visible, *annotations]:
        eqs = equalities(chunk)
        for eq in eqs:
            if _running_total(eq):
                continue
            check = _check(eq)
            if check is not None:
                checks.append(check)
    return checks


def _running_total(eq: Equality) -> bool:
    """``2*3 = 6+4 = 10``: the right side is a computation that starts from the left side's value,
    so this link is a running total (its own result is checked by the next link), not ``6 = 10``."""
    if eq.right.is_literal:
        return False
    first = eq.right.tokens[0]
    return first.kind == "num" and first.value == eq.left.value(sympy.Rational(1, 100))


# ---------------------------------------------------------------------------------------------
# verdict


@dataclass
class RuleVerdict:
    """What :func:`judge` found. ``steps_checked``: the steps that held a checkable equality."""

    status: str  # "error" | "no_error_found" | "no_verdict"
    first_error_step: int = -1  # 1-based step index; -1 unless status == "error"
    primary_error_type: str | None = None  # "computational_error" when status == "error"
    expression: str | None = None  # the false equality as normalised
    expected: str | None = None  # the value its computed side really has
    explanation: str = ""
    checked: int = 0  # equalities checked (up to and including the faulty one)
    steps_checked: list[int] = field(default_factory=list)

    @property
    def predicted_step(self) -> int:
        """ProcessBench prediction: the faulty step, or -1 when the judge found none."""
        return self.first_error_step if self.status == "error" else -1


def format_value(value: sympy.Rational) -> str:
    value = sympy.Rational(value)
    if value.q == 1:
        return str(value.p)
    q = value.q
    for p in (2, 5):
        while q % p == 0:
            q //= p
    if q == 1:  # a terminating decimal
        return _exact_decimal(value)
    return f"{value.p}/{value.q} (≈ {float(value):.6g})"


def _exact_decimal(value: sympy.Rational) -> str:
    sign = "-" if value < 0 else ""
    num, den = abs(value.p), value.q
    digits = 0
    while (num * 10**digits) % den:
        digits += 1
    scaled = num * 10**digits // den
    whole, frac = divmod(scaled, 10**digits)
    return f"{sign}{whole}.{str(frac).zfill(digits)}" if digits else f"{sign}{whole}"


def judge(response: str) -> RuleVerdict:
    """The first step of ``response`` with a false equality (see the module doc)."""
    checked = 0
    steps_checked: list[int] = []
    for step in steps_mod.segment(response):
        checks = check_text(step.body)
        if checks:
            steps_checked.append(step.index)
        for check in checks:
            checked += 1
            if not check.holds:
                expected = format_value(check.expected)
                return RuleVerdict(
                    "error", step.index, "computational_error", check.expression, expected,
                    f"step {step.index}: {check.expression} is false; the computation gives {expected}",
                    checked, steps_checked,
                )
    if not checked:
        return RuleVerdict("no_verdict", explanation="no checkable equality found", steps_checked=steps_checked)
    return RuleVerdict("no_error_found", explanation=f"all {checked} checked equalities hold", checked=checked,
                       steps_checked=steps_checked)


@JUDGES.register(RULE)
class RuleJudge(InlineJudge):
    """The sympy arithmetic judge as a voter (never unjudged, never raises)."""

    name = RULE

    def judge(self, case: Case) -> Vote:
        t0 = time.perf_counter()
        try:
            verdict = judge(case.response)  # the module's checker
        except Exception as exc:  # noqa: BLE001
            return Vote(RULE, "unjudged", reason=f"rule judge failed ({type(exc).__name__})", attempts=1)
        took = time.perf_counter() - t0
        if verdict.status == "error":
            return Vote(RULE, "error", verdict.first_error_step, verdict.primary_error_type, verdict.explanation,
                        None, attempts=1, latency_s=took)
        return Vote(RULE, "abstain", explanation=verdict.explanation, reason=verdict.status, attempts=1,
                    latency_s=took)
