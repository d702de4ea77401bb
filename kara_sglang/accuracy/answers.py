"""An answer out of a model's output, and whether it matches the reference.

Extraction modes (``--extract``):

- ``boxed``: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces
  included; ``\\boxed 5`` without braces gives ``5``
- ``last-number``: the last integer or decimal in the output, thousands commas removed
- ``regex:PATTERN``: the first group of the last match of PATTERN (the whole match when it
  has no group)

Comparison normalises both sides (spaces, ``$``, trailing ``.``, ``\\text{}``, ``\\left`` /
``\\right``, ``\\dfrac``) and compares numerically when both read as numbers, so ``42.0``
equals ``42`` and ``1,000`` equals ``1000``. It is deliberately simple: no symbolic algebra,
so ``\\frac{1}{2}`` equals ``0.5`` but ``2\\sqrt{2}`` does not equal ``\\sqrt{8}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from kara_sglang.accuracy import InputError

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> Optional[str]:
    """Content of the brace group opening at ``text[start]``; None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def extract_boxed(text: str) -> Optional[str]:
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
            if content is not None:  # an unclosed box (cut-off output): try an earlier one
                return content
        elif match.group().endswith((" ", "\t")) and end < len(text):  # "\boxed 5"
            word = re.match(r"[^\s$]+", text[end:])
            if word:
                return word.group()
    return None


def extract_last_number(text: str) -> Optional[str]:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


@dataclass(frozen=True)
class Extractor:
    name: str  # as given to --extract
    extract: Callable[[str], Optional[str]]

    def __call__(self, text: str) -> Optional[str]:
        return self.extract(text)


def make_extractor(spec: str) -> Extractor:
    """``boxed``, ``last-number`` or ``regex:PATTERN``; raises :class:`InputError`."""
    if spec == "boxed":
        return Extractor(spec, extract_boxed)
    if spec == "last-number":
        return Extractor(spec, extract_last_number)
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):], re.S)
        except re.error as err:
            raise InputError(f"--extract: bad regular expression ({err})") from None

        def extract_regex(text: str) -> Optional[str]:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            last = matches[-1]
            return last.group(1) if pattern.groups else last.group()

        return Extractor(spec, extract_regex)
    raise InputError(f"--extract: unknown mode {spec!r} (boxed, last-number or regex:PATTERN)")


def _unwrap(text: str, command: str) -> str:
    r"""``\command{x}`` -> ``x`` everywhere (nested braces kept)."""
    out, i, head = [], 0, "\\" + command + "{"
    while True:
        j = text.find(head, i)
        if j < 0:
            return "".join(out) + text[i:]
        content = _braced(text, j + len(head) - 1)
        if content is None:
            return "".join(out) + text[i:]
        out.append(text[i:j] + content)
        i = j + len(head) + len(content) + 1


def normalize(answer: str) -> str:
    """The answer's canonical text for comparison."""
    text = str(answer).strip()
    for command in ("text", "textbf", "mathrm", "mbox"):
        text = _unwrap(text, command)
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\^\{?\\circ\}?", "", text)  # degrees: 90^\circ == 90
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ "):
        text = text.replace(spacing, "")
    text = text.replace("$", "")
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


def as_number(text: str) -> Optional[float]:
    r"""The value of a normalised answer that is a number (``1,000``, ``-2.5``, ``\frac{3}{4}``, ``3/4``)."""
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+)(?:\.\d+)?", text):
        text = text.replace(",", "")
    fraction = (re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(\d+)\}?", text)
                or re.fullmatch(r"(-?)(-?\d+)/(\d+)", text))
    if fraction:
        sign, top, bottom = fraction.groups()
        if int(bottom) == 0:
            return None
        return (-1 if sign else 1) * int(top) / int(bottom)
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text):
        return float(text)
    return None


def answers_match(predicted: Optional[str], reference: str) -> bool:
    if predicted is None:
        return False
    got, want = normalize(predicted), normalize(reference)
    if got == want:
        return True
    got_value, want_value = as_number(got), as_number(want)
    if got_value is None or want_value is None:
        return False
    return math.isclose(got_value, want_value, rel_tol=1e-9, abs_tol=1e-9)
