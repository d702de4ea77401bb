"""Continuing a streaming session on its compressed KV (per request: ``kara_session_continue``).

Without it, a finished turn hands its session only the exact prefix of its row, and the next
turn re-prefills the compressed part of the reply. With it, the session keeps the compacted
row, and the next turn's prompt is built in *KV space*: the conversation so far with the
evicted token ids left out, so that column ``j`` of the row holds the KV of prompt token
``j``. SGLang's streaming session then matches the whole row as the new turn's prefix
(``min(kv_committed_len, len(prompt))``, no token comparison) and prefills only the new
tokens; no reply token is prefilled again.

Each token keeps its RoPE position: a :class:`History` carries the position of every id, and
the new turn's tokens sit ``evicted`` past their column, as decode tokens already do after a
compression. The radix tree never sees a KV-space prompt as exact: turns after the first
never publish to it, and a turn that leaves its slot (abort) is cut back to
``History.exact_len`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from kara_sglang.config import KaraConfigError, check_custom_params

KEY = "kara_session_continue"


def requested(custom_params: Optional[Mapping[str, Any]]) -> bool:
    """Whether a request's ``custom_params`` opt in; a non-boolean value is refused."""
    if not custom_params:
        return False
    check_custom_params(custom_params)
    if KEY not in custom_params:
        return False
    value = custom_params[KEY]
    if not isinstance(value, bool):
        raise KaraConfigError(f"{KEY}: must be true or false, not {value!r}")
    return value


@dataclass(frozen=True)
class History:
    """What a finished, compressed turn leaves its session: the conversation in KV space.

    ``ids[j]`` is the token whose KV column ``j`` of the session's row holds, at RoPE
    position ``positions[j]``; ``evicted`` tokens of the conversation have no column.
    """

    ids: List[int]
    positions: List[int]
    evicted: int

    @property
    def exact_len(self) -> int:
        """Leading columns that are still the token-space conversation (safe for the tree)."""
        for j, p in enumerate(self.positions):
            if p != j:
                return j
        return len(self.positions)

    def position(self, column: int) -> int:
        """RoPE position of a column; past the history, a new token sits ``evicted`` later."""
        return self.positions[column] if column < len(self.positions) else column + self.evicted


def after_turn(prompt_ids: Sequence[int], prompt_positions: Optional[Sequence[int]], output_ids: Sequence[int],
               kept_decode: Sequence[int], decoded: int, evicted: int) -> History:
    """The KV-space conversation after a turn.

    ``prompt_ids`` (with ``prompt_positions``; ``None`` = 0, 1, ...) occupy the first
    columns; output token ``i`` sits one past the prompt's last position plus ``i``. Of the
    first ``decoded`` output tokens the row holds ``kept_decode`` (ascending decode
    indices); every later output token holds its column (or, the last one, none yet: the
    next turn prefills it). ``evicted``: the conversation's total.
    """
    if prompt_positions is None:
        prompt_positions = range(len(prompt_ids))
    if len(prompt_positions) != len(prompt_ids) or not prompt_ids:
        raise ValueError("each prompt token needs one position")
    first_output = prompt_positions[-1] + 1
    outputs = list(kept_decode) + list(range(decoded, len(output_ids)))
    ids = list(prompt_ids) + [int(output_ids[i]) for i in outputs]
    positions = list(prompt_positions) + [first_output + i for i in outputs]
    if positions[-1] + 1 - len(positions) != evicted:
        raise AssertionError(f"kara: {len(positions)} columns and {evicted} evicted do not add up to "
                             f"{positions[-1] + 1} conversation tokens")
    return History(ids, positions, evicted)
