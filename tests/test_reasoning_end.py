"""The end-of-thinking marker rule of ``--kara-scope reasoning`` (no SGLang needed)."""

import pytest

from kara_sglang.reasoning import ReasoningEnd


def test_single_and_multi_token_markers_are_seen_only_when_complete():
    one = ReasoningEnd([7])
    assert one.just_emitted([1, 2, 7]) and not one.just_emitted([7, 2]) and not one.just_emitted([])
    three = ReasoningEnd([5, 6, 7])
    assert three.just_emitted([1, 5, 6, 7])
    assert not three.just_emitted([1, 6, 6, 7])  # last token alone is not the marker
    assert not three.just_emitted([6, 7])


def test_prompt_closing_thinking_is_recognised_within_a_few_tokens_of_its_end():
    end = ReasoningEnd([5, 6])
    assert end.closed_in_prompt([1, 2, 5, 6])
    assert end.closed_in_prompt([1, 5, 6, 9, 9, 9, 9])  # template newlines after the marker
    assert not end.closed_in_prompt([5, 6, 9, 9, 9, 9, 9])  # an earlier turn's marker
    assert not end.closed_in_prompt([1, 2, 3])


def test_marker_anywhere_in_a_reply_is_found():
    # A request re-prefilled after a retraction that had already left its thinking.
    end = ReasoningEnd([5, 6, 7])
    assert end.emitted_in([5, 6, 7]) and end.emitted_in([1, 5, 6, 7, 2, 3])
    assert not end.emitted_in([5, 6, 1, 7]) and not end.emitted_in([6, 7]) and not end.emitted_in([])
    assert ReasoningEnd([7]).emitted_in([1, 7, 2])


def test_empty_marker_is_refused():
    with pytest.raises(ValueError):
        ReasoningEnd([])
