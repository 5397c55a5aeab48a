"""Step segmentation of a model response.

A response is cut into 1-indexed steps, by the first rule that applies:

1. numbered steps: lines opening with "Step k:" / "Step k." / "Step k)" (optionally in markdown
   bold or a heading), or, when there are at least two of them, list items "k." / "k)". A step
   runs from its marker to the next marker and may span several lines; text before the first
   marker is preamble, not a step.
2. paragraphs (blocks separated by blank lines), when there are at least two;
3. otherwise every non-blank line.

The final-answer line ("The answer is ...", "Final answer: ...", "#### N", a lone ``\\boxed{}``
line) is never a step, and ends the step it follows. A line that is only a thinking tag
(``<think>``, ``</think>``) counts as blank: a reasoning model's trace without "Step k:" markers is
cut into its paragraphs (ProcessBench's convention), the tags in none of them. Indices are positions (1, 2, 3, ...), not
the numbers the model wrote, so "Step 1, Step 2, Step 2" is three steps.

Each :class:`Step` carries its exact span: ``response[start_char:end_char] == step.text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Markdown decoration a model may put in front of a marker or an answer line: "**", "##", "> ".
_DECOR = r"[ \t]*(?:[*_#>][*_#> \t]*)?"
_STEP_MARKER = re.compile(rf"^{_DECOR}step[ \t]*(\d+)[ \t]*(?:\*\*[ \t]*)?[:.)]", re.IGNORECASE)
_LIST_MARKER = re.compile(rf"^{_DECOR}(\d+)[.)](?:[ \t]|$)")
_ANY_MARKER = re.compile(
    rf"^{_DECOR}(?:step[ \t]*\d+[ \t]*(?:\*\*[ \t]*)?[:.)]|\d+[.)](?=[ \t]|$))[*_ \t]*", re.IGNORECASE
)
_FINAL_LINE = re.compile(
    rf"^{_DECOR}(?:(?:so|therefore|thus|hence)\b[ \t,]*)?(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t*]*(?:is\b|:)"
    r"|^[ \t]*####"
    r"|^[ \t]*(?:\$\$?|\\\[|\\\()?[ \t]*\\boxed\{.*\}[ \t]*(?:\$\$?|\\\]|\\\))?[ \t]*\.?[ \t]*$",
    re.IGNORECASE,
)


_THINK_TAG = re.compile(r"^[ \t]*</?think>[ \t]*$", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    index: int  # 1-based position in the response
    text: str  # response[start_char:end_char], marker included, surrounding whitespace excluded
    start_char: int
    end_char: int

    @property
    def body(self) -> str:
        """The step's text without its "Step k:" / "k." marker."""
        return strip_marker(self.text)


def strip_marker(text: str) -> str:
    return _ANY_MARKER.sub("", text, count=1).strip()


def is_final_answer_line(line: str) -> bool:
    return bool(_FINAL_LINE.match(line))


@dataclass(frozen=True)
class _Line:
    start: int
    end: int  # exclusive, without the line terminator
    text: str

    @property
    def blank(self) -> bool:
        return not self.text.strip() or bool(_THINK_TAG.match(self.text))


def _lines(response: str) -> list[_Line]:
    out, pos = [], 0
    for raw in response.split("\n"):
        text = raw[:-1] if raw.endswith("\r") else raw
        out.append(_Line(pos, pos + len(text), text))
        pos += len(raw) + 1
    return out


def _make_step(response: str, index: int, lines: list[_Line]) -> Step | None:
    content = [ln for ln in lines if not ln.blank]
    if not content:
        return None
    first, last = content[0], content[-1]
    start = first.start + (len(first.text) - len(first.text.lstrip()))
    end = last.start + len(last.text.rstrip())
    return Step(index, response[start:end], start, end)


def _blocks(lines: list[_Line], starts_block, blank_breaks: bool, need_marker: bool) -> list[list[_Line]]:
    """Group lines into blocks: a block starts at a line where ``starts_block`` holds (and, unless
    ``need_marker``, after a break); final-answer lines are dropped and break the block; blank lines
    break it when ``blank_breaks``. With ``need_marker`` a block only opens at a marker line."""
    blocks: list[list[_Line]] = []
    current: list[_Line] | None = None
    for line in lines:
        if is_final_answer_line(line.text):
            current = None
            continue
        if starts_block(line):
            current = [line]
            blocks.append(current)
        elif line.blank and blank_breaks:
            current = None
        elif current is not None:
            current.append(line)
        elif not need_marker and not line.blank:
            current = [line]
            blocks.append(current)
    return blocks


def segment(response: str) -> list[Step]:
    """The response's steps, 1-indexed, final-answer line excluded (see the module doc)."""
    if not isinstance(response, str) or not response.strip():
        return []
    lines = _lines(response)
    step_lines = [ln for ln in lines if _STEP_MARKER.match(ln.text)]
    list_lines = [ln for ln in lines if _LIST_MARKER.match(ln.text)]
    if step_lines:
        blocks = _blocks(lines, lambda ln: bool(_STEP_MARKER.match(ln.text)), False, True)
    elif len(list_lines) >= 2:
        blocks = _blocks(lines, lambda ln: bool(_LIST_MARKER.match(ln.text)), False, True)
    else:
        blocks = _blocks(lines, lambda ln: False, True, False)
        if len(blocks) < 2:  # one paragraph (or none): fall back to lines
            blocks = [[ln] for ln in lines if not ln.blank and not is_final_answer_line(ln.text)]
    steps: list[Step] = []
    for block in blocks:
        step = _make_step(response, len(steps) + 1, block)
        if step is not None:
            steps.append(step)
    return steps


def cut_before(response: str, step_index: int) -> str:
    """The exact prefix of ``response`` that precedes step ``step_index`` (1-based).

    ``step_index == len(steps) + 1`` names the step the response never wrote (it stopped or
    jumped to its answer too early): the prefix then runs through the last step and its line
    break, up to the final-answer line. The result is always ``response[:i]`` for some ``i``.
    """
    steps = segment(response)
    if not 1 <= step_index <= len(steps) + 1:
        raise ValueError(
            f"step_index must be in 1..{len(steps) + 1} for a response with {len(steps)} steps, got {step_index}"
        )
    if step_index <= len(steps):
        return response[: steps[step_index - 1].start_char]
    if not steps:
        return ""
    end = steps[-1].end_char
    newline = response.find("\n", end)
    return response if newline < 0 else response[: newline + 1]
