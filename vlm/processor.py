"""Turns images and chat messages into model inputs: the LM's own chat template, the image
placeholder expanded to one token per image feature, and labels on assistant tokens only.

Messages use the transformers format: [{"role": "user", "content": "<image>\\nWhat shape?"}, ...].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlm.language_model import IMAGE_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class PromptError(ValueError):
    """A conversation cannot be encoded as asked; the message says why."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class VLMProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 image_transform: Callable[[list[Image.Image]], torch.Tensor], num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def encode(
        self, messages: list[dict], add_generation_prompt: bool = False, max_length: int | None = None
    ) -> Encoded:
        """Token ids and labels for a conversation.

        The chat template renders the conversation once per assistant turn; the text each turn
        adds is tokenised on its own, so assistant spans are exact for any template, and the
        prompt tokens at inference are the same tokens the model saw before each answer in training.
        """
        segments = self._segments(messages, add_generation_prompt)
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_answer in segments:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if max_length is not None and len(input_ids) > max_length:
            image_positions = [i for i, t in enumerate(input_ids) if t == self.image_token_id]
            if image_positions and image_positions[-1] >= max_length:
                raise PromptError(
                    f"the image tokens end at position {image_positions[-1] + 1}, past max_length={max_length}; "
                    "raise data.max_length or compress image tokens (model.projector.compress)"
                )
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        return Encoded(input_ids, labels)

    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        render = self._render
        expanded = IMAGE_TOKEN * self.num_image_tokens
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True)
            through = render(messages[: i + 1], add_generation_prompt=False)
            if not (before.startswith(done) and through.startswith(before)):
                raise PromptError("this LM's chat template does not render conversations incrementally")
            segments += [(before[len(done):].replace(IMAGE_TOKEN, expanded), False), (through[len(before):], True)]
            done = through
        full = render(messages, add_generation_prompt=add_generation_prompt)
        if len(full) > len(done):
            segments.append((full[len(done):].replace(IMAGE_TOKEN, expanded), False))
        return segments

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def pad(self, batch: list[Encoded], padding_side: str = "right", pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
        """Pad to the longest, rounded up to `pad_to_multiple_of`; left padding for generation so every
        prompt ends at the last column."""
        longest = max(len(e.input_ids) for e in batch)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            cols = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(e.input_ids)
            labels[row, cols] = torch.tensor(e.labels)
            mask[row, cols] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def with_image_placeholder(messages: list[dict]) -> list[dict]:
    """Put `<image>` at the start of the first user turn if the conversation has none (LLaVA's convention)."""
    if any(IMAGE_TOKEN in str(m.get("content", "")) for m in messages):
        return messages
    out = [dict(m) for m in messages]
    first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first_user]["content"] = f"{IMAGE_TOKEN}\n{out[first_user]['content']}"
    return out
