"""Rendering conversations with the tokenizer's own chat template.

Training, export checks and evaluation all render through here, so the text a
model is trained on is exactly the text the exported GGUF will be prompted
with. ``encode`` marks which tokens belong to assistant turns (the only ones
that carry loss) by rendering growing prefixes of the conversation and mapping
character spans to tokens, which works for any prefix-stable template without
``{% generation %}`` markers.
"""

from __future__ import annotations

from .errors import InvalidInput


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_and_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the last assistant turn, and that turn's text."""
    return messages[:-1], messages[-1]["content"]


def encode(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids and an assistant mask (1 where the loss applies) for one conversation."""
    full = render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(upto)):
            raise InvalidInput(
                "the model's chat template renders a conversation differently from its prefixes, so assistant "
                "turns cannot be located; use a model whose template is prefix-stable."
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"][:max_length]]
    return {"input_ids": ids, "assistant_masks": mask}
