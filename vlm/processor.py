"""Turns images and chat messages into model inputs: the LM's own chat template, the image
placeholder expanded to one token per image feature, and labels on assistant tokens only.

Messages use the transformers format. A user turn's content is a string in LLaVA's convention, where
`<image>` marks the image ([{"role": "user", "content": "<image>\\nWhat shape?"}, ...]: training data),
or a list of parts, {"type": "image"} and {"type": "text", "text": ...}, whose text is only ever text
(what people type in chat, the demo and benchmark questions: see `typed_messages`). Message text
never becomes a control token: only the template's own markup does.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlm.language_model import IMAGE_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Stands in for message i's content while the template renders: private-use characters no template writes.
CONTENT = re.compile("\ue000(\\d+)\ue001")
# Whether typed control tokens stay text is one switch on the shared Rust tokenizer, set by every call
# (off for the template's text, on for message text), and encoding releases the GIL: the demo's users,
# encoding at once in their own threads, could each tokenise with the other's switch, turning the
# template's control tokens into text or a typed <|im_end|> into a control token.
_TOKENIZING = threading.Lock()


class PromptError(ValueError):
    """A conversation cannot be encoded as asked; the message says why."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class VLMProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 image_transform: Callable[[list[Image.Image]], torch.Tensor], num_image_tokens: int,
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def encode(
        self, messages: list[dict], add_generation_prompt: bool = False, max_length: int | None = None
    ) -> Encoded:
        """Token ids and labels for a conversation.

        The chat template renders the conversation once per assistant turn; the tokens each turn
        adds are kept on their own, so assistant spans are exact for any template, and the
        prompt tokens at inference are the same tokens the model saw before each answer in training.
        The template renders stand-ins for the message contents: its own text is tokenised with its
        control tokens, each content as plain text, so a user who types `<|im_end|>` gets those
        characters, not the end of their turn.
        """
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        stand_ins = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        segments = self._segments(stand_ins, add_generation_prompt)
        parts = [_parts(m) for m in messages]
        if self._template_trims(messages, parts, "".join(text for text, _ in segments), add_generation_prompt):
            parts = [_stripped(p) for p in parts]
        contents = [self._content_ids(p) for p in parts]
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_answer in segments:
            ids = []
            for k, piece in enumerate(CONTENT.split(text)):  # template text, content index, template text, ...
                ids += contents[int(piece)] if k % 2 else self._tokenize(piece, split_special_tokens=False)
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
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True)
            through = render(messages[: i + 1], add_generation_prompt=False)
            if not (before.startswith(done) and through.startswith(before)):
                raise PromptError("this LM's chat template does not render conversations incrementally")
            segments += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        full = render(messages, add_generation_prompt=add_generation_prompt)
        if not full.startswith(done):
            raise PromptError("this LM's chat template does not render conversations incrementally")
        if len(full) > len(done):
            segments.append((full[len(done):], False))
        return segments

    def _template_trims(
        self, messages: list[dict], parts: list[list], rendered: str, add_generation_prompt: bool
    ) -> bool:
        """Whether the template strips message text (Llama 3's and Gemma's do), checked against its
        rendering of the real text, so the tokens are always the text the template writes."""
        texts = ["".join(IMAGE_TOKEN if p is None else p for p in ps) for ps in parts]
        real = self._render([{**m, "content": t} for m, t in zip(messages, texts, strict=True)], add_generation_prompt)
        for strip in (False, True):
            written = [t.strip() for t in texts] if strip else texts
            if CONTENT.sub(lambda m, written=written: written[int(m[1])], rendered) == real:
                return strip
        raise PromptError("this LM's chat template rewrites message text, so vlm cannot keep it apart from "
                          "the template's own control tokens; pick an LM whose template copies messages as written")

    def _content_ids(self, parts: list[str | None]) -> list[int]:
        ids = []
        for part in parts:
            if part is None:
                ids += [self.image_token_id] * self.num_image_tokens
            elif part:
                ids += self._tokenize(part, split_special_tokens=True)
        return ids

    def _tokenize(self, text: str, split_special_tokens: bool) -> list[int]:
        with _TOKENIZING:
            encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)
        return encoded["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def training_positions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Where the loss reads (supervised targets, shifted by one) and where image features go, as
        [2, n] (row, column) tensors. Found here, on the CPU where batches are built, the training step
        never has to stop and wait for the GPU to find them (VisionLanguageModel.forward)."""
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX
        images = batch["input_ids"] == self.image_token_id
        return {"supervised_at": torch.stack(supervised.nonzero(as_tuple=True)),
                "images_at": torch.stack(images.nonzero(as_tuple=True))}

    def pack(self, batch: list[Encoded], rows: int, length: int) -> dict[str, torch.Tensor]:
        """Examples laid out in order in `rows` rows of `length` tokens, a new row wherever the next one
        does not fit; position ids restart at 0 for each example, which is how the model tells them apart
        (VisionLanguageModel.packed_attention_mask). ValueError if they need more rows."""
        ids = torch.full((rows, length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
        # Padding at a row's end continues its last example's positions: causal attention keeps it out of
        # that example's sight, and a position 0 there would only add a sequence.
        positions = torch.arange(length).repeat(rows, 1)
        row, col = 0, 0
        for e in batch:
            n = len(e.input_ids)
            if col + n > length:
                row, col = row + 1, 0
            if row >= rows or n > length:
                raise ValueError(f"{len(batch)} examples of {sum(len(e.input_ids) for e in batch)} tokens do not fit "
                                 f"in {rows} rows of {length} tokens")
            ids[row, col: col + n] = torch.tensor(e.input_ids)
            labels[row, col: col + n] = torch.tensor(e.labels)
            # The token before an example's first belongs to another example. Unpacked, the first label is
            # never a target (targets are shifted by one); packed, it must not become one either.
            labels[row, col] = IGNORE_INDEX
            positions[row, col: col + n] = torch.arange(n)
            col += n
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

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
    """Put `<image>` at the start of the first user turn if no user turn has one (LLaVA's convention)."""
    if any(IMAGE_TOKEN in str(m.get("content", "")) for m in messages if m["role"] == "user"):
        return messages
    out = [dict(m) for m in messages]
    first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first_user]["content"] = f"{IMAGE_TOKEN}\n{out[first_user]['content']}"
    return out


def typed_messages(messages: list[dict], with_image: bool) -> list[dict]:
    """Messages people wrote, as text parts, so nothing typed becomes an image slot or a control token.

    The image goes where with_image_placeholder puts it in training data, `<image>\\n` at the start
    of the first user turn, so the prompt is the one the model was trained on.
    """
    out = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    if with_image:
        first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
        out[first_user]["content"] = [
            {"type": "image"},
            {"type": "text", "text": f"\n{messages[first_user]['content']}"},
        ]
    return out


def _parts(message: dict) -> list[str | None]:
    """A message's content as text pieces and image slots (None)."""
    content = message["content"]
    if not isinstance(content, str):
        return [part["text"] if part["type"] == "text" else None for part in content]
    if message["role"] != "user":  # LLaVA marks the image in a user turn; anywhere else `<image>` is text
        return [content]
    parts: list[str | None] = []
    for i, text in enumerate(content.split(IMAGE_TOKEN)):
        parts += [None, text] if i else [text]
    return parts


def _stripped(parts: list[str | None]) -> list[str | None]:
    parts = list(parts)
    if isinstance(parts[0], str):
        parts[0] = parts[0].lstrip()
    if isinstance(parts[-1], str):
        parts[-1] = parts[-1].rstrip()
    return parts
