"""Problems with reference answers from a JSONL file, in the common benchmark layouts.

Layouts (field names matched case-insensitively, so AIME 2024's ``Problem``/``Answer`` work):

- ``math500``: ``problem`` / ``answer`` (HuggingFaceH4/MATH-500's test.jsonl)
- ``aime``: ``problem`` or ``question`` / ``answer``; the answer may be an integer
- ``gsm8k``: ``question`` / ``answer``; the reference is what follows ``####`` in the answer
- ``auto``: picked from the first record's fields (gsm8k when its answer has ``####``)

``--question-field`` / ``--answer-field`` name other fields; they override the layout's (a
file of another layout with only one of them named takes ``problem`` or ``question`` /
``answer`` for the other).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kara_sglang.accuracy import InputError

# layout -> (question field candidates, answer field candidates), first present wins
LAYOUTS: Dict[str, Tuple[Sequence[str], Sequence[str]]] = {
    "math500": (("problem",), ("answer",)),
    "aime": (("problem", "question"), ("answer",)),
    "gsm8k": (("question",), ("answer",)),
}
LAYOUT_CHOICES = ("auto",) + tuple(LAYOUTS)
GSM8K_MARK = "####"


@dataclass(frozen=True)
class Problem:
    index: int  # 0-based among the file's problems
    line: int  # 1-based line in the file, for messages and records
    question: str
    reference: str


def _field(record: Dict[str, Any], candidates: Sequence[str]) -> Optional[str]:
    """The record's key matching one of ``candidates`` (case-insensitive), in candidate order."""
    lowered = {key.lower(): key for key in record}
    for name in candidates:
        if name in record:
            return name
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def _detect_layout(record: Dict[str, Any]) -> Optional[str]:
    answer = _field(record, ("answer",))
    if answer is None:
        return None
    if _field(record, ("question",)) and GSM8K_MARK in str(record[answer]):
        return "gsm8k"
    if _field(record, ("problem",)):
        return "math500"
    if _field(record, ("question",)):
        return "aime"
    return None


def _records(path: Path):
    """(line number, JSON object) for each non-blank line; one-line errors for the rest."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read the file ({err.strerror or err})") from None
    with handle:
        try:
            for number, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path} line {number}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path} line {number}: expected a JSON object, "
                                     f"got {type(record).__name__}")
                yield number, record
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None


def load_problems(path: str | Path, layout: str = "auto", question_field: Optional[str] = None,
                  answer_field: Optional[str] = None, limit: Optional[int] = None) -> List[Problem]:
    """The file's problems (the first ``limit`` of them); raises :class:`InputError`."""
    path = Path(path)
    if layout not in LAYOUT_CHOICES:
        raise InputError(f"--layout: unknown layout {layout!r} (choose from {', '.join(LAYOUT_CHOICES)})")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a JSONL file")
    problems: List[Problem] = []
    chosen = None if layout == "auto" else layout
    if chosen is None and question_field and answer_field:
        chosen = "custom"  # both fields named: nothing to detect
    for number, record in _records(path):
        if limit is not None and len(problems) >= limit:
            break
        if chosen is None:
            chosen = _detect_layout(record)
            if chosen is None and (question_field or answer_field):
                chosen = "custom"  # one field named; the other takes the usual names
            if chosen is None:
                raise InputError(
                    f"{path} line {number}: cannot tell the layout from fields "
                    f"{', '.join(sorted(record)) or '(none)'}; pass --layout or "
                    f"--question-field/--answer-field")
        q_names, a_names = LAYOUTS.get(chosen, LAYOUTS["aime"])  # custom: problem or question / answer
        q_key = _field(record, (question_field,) if question_field else q_names)
        a_key = _field(record, (answer_field,) if answer_field else a_names)
        for key, wanted in ((q_key, question_field or " or ".join(q_names)),
                            (a_key, answer_field or " or ".join(a_names))):
            if key is None:
                raise InputError(f"{path} line {number}: no field {wanted!r} "
                                 f"(has: {', '.join(sorted(record)) or 'none'})")
            if record[key] is None:
                raise InputError(f"{path} line {number}: field {key!r} is null")
        reference = record[a_key]
        if isinstance(reference, (dict, list)):
            raise InputError(f"{path} line {number}: field {a_key!r} is not a string or number")
        reference = str(reference)
        if chosen == "gsm8k":
            if GSM8K_MARK not in reference:
                raise InputError(f"{path} line {number}: gsm8k answer has no '{GSM8K_MARK} <answer>'")
            reference = reference.rsplit(GSM8K_MARK, 1)[1]
        problems.append(Problem(index=len(problems), line=number, question=str(record[q_key]),
                                reference=reference.strip()))
    if not problems:
        raise InputError(f"{path}: no problems (the file is empty)")
    return problems
