"""A problem's question -> the prompt part of a ``/generate`` request.

``--prompt-template`` is plain text in which ``{question}`` is replaced (no other braces are
special, so ``\\boxed{}`` may appear in it). ``--chat-template-from TOKENIZER`` then wraps it in
that tokenizer's chat template client-side and sends token ids: sending the templated text
would make the server add its BOS token a second time.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from kara_sglang.accuracy import InputError

PLACEHOLDER = "{question}"


def make_prompt_builder(template: str, chat_template_from: Optional[str]) -> Callable[[str], Dict[str, Any]]:
    if PLACEHOLDER not in template:
        raise InputError(f"--prompt-template: must contain {PLACEHOLDER}")

    def fill(question: str) -> str:
        return template.replace(PLACEHOLDER, question)

    if not chat_template_from:
        return lambda question: {"text": fill(question)}

    try:
        from transformers import AutoTokenizer  # only this option needs transformers
    except ImportError:
        raise InputError("--chat-template-from needs the transformers package") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(chat_template_from)
    except Exception as err:  # transformers raises many types for a bad path
        raise InputError(f"--chat-template-from: cannot load a tokenizer from {chat_template_from} "
                         f"({' '.join(str(err).split())[:200]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"--chat-template-from: the tokenizer at {chat_template_from} has no chat template")

    def chat(question: str) -> Dict[str, Any]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": fill(question)}],
                                             tokenize=False, add_generation_prompt=True)
        return {"input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}

    return chat
