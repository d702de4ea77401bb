"""Where a request's reasoning ends: the end-of-thinking marker in its token ids.

Under ``--kara-scope reasoning`` only the thinking segment is compressed; the final answer
and any tool call after the marker keep their exact KV. The rule, per request:

- the prompt ends the thinking already (the marker is among the prompt's last tokens, e.g.
  a template that disables thinking appends ``<think>\\n\\n</think>\\n\\n``): nothing of the
  reply is compressed;
- otherwise decoding starts in the thinking segment, and once the model emits the marker,
  compression stops for the rest of the request. Decode tokens before the marker that no
  window has reached yet stay exact too: a window never spans the marker.

The marker is a token-id sequence (several tokens where the tokenizer splits it).
"""

from __future__ import annotations

from typing import Sequence, Tuple

# How far before the end of a prompt a marker still counts as "the template closed thinking"
# (templates put a few newline tokens after it).
PROMPT_TAIL_SLACK = 4


class ReasoningEnd:
    def __init__(self, marker_ids: Sequence[int]) -> None:
        if not marker_ids:
            raise ValueError("the end-of-thinking marker has no tokens")
        self.ids: Tuple[int, ...] = tuple(int(t) for t in marker_ids)
        self._last = self.ids[-1]

    def just_emitted(self, output_ids: Sequence[int]) -> bool:
        """Does the output end with the marker? (Called once per decoded token.)"""
        n = len(self.ids)
        return bool(output_ids) and output_ids[-1] == self._last and \
            tuple(output_ids[-n:]) == self.ids

    def emitted_in(self, output_ids: Sequence[int]) -> bool:
        """Is the marker anywhere in ``output_ids``? (Once per request, at its first decode step.)"""
        n, ids = len(self.ids), self.ids
        return any(output_ids[i] == self._last and tuple(output_ids[i - n + 1:i + 1]) == ids
                   for i in range(n - 1, len(output_ids)))

    def closed_in_prompt(self, prompt_ids: Sequence[int]) -> bool:
        """Does the prompt's tail already close the thinking segment?"""
        tail = tuple(prompt_ids[-(len(self.ids) + PROMPT_TAIL_SLACK):])
        n = len(self.ids)
        return any(tail[i:i + n] == self.ids for i in range(len(tail) - n + 1))
