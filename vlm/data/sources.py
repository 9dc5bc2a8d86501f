"""Training examples from the three source kinds, all as chat messages with one image.

- llava: LLaVA JSON (558k caption records and 665k multi-turn records alike): `image` relative to
  an image root, `conversations` of {"from": "human"|"gpt", "value": ...} with `<image>` in the first human turn.
- hf: a Hugging Face dataset (hub id, or a local folder / .json / .jsonl / .parquet / .csv file),
  read through a column mapping: image + caption (align) or image + question + answer (instruct).
- easy_vqa: the packaged dataset; captions derived from its annotations (align), questions with
  LLaVA's short-answer suffix (instruct).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.config import ConfigError, DataSource
from vlm.data.easy_vqa import describe, easy_vqa_questions
from vlm.images import load_image
from vlm.language_model import IMAGE_TOKEN
from vlm.processor import with_image_placeholder
from vlm.prompts import SHORT_ANSWER

CAPTION_PROMPT = "Describe the image briefly."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# easy-VQA questions per training conversation: several questions about one image share its
# image tokens and the system prompt, which is most of a single-question sequence.
EASY_VQA_TURNS = 4


@dataclass
class Example:
    key: str  # names the image for the feature cache; changes when the image file changes
    load: Callable[[], Image.Image] | None  # None for a text-only example
    messages: list[dict]


class FileImages:
    """Opens images by path, relative to `root` when there is one."""

    def __init__(self, root: Path | None = None):
        self.root = root

    def __call__(self, path: str) -> Image.Image:
        return load_image(self.root / path if self.root else path)


class DatasetImages:
    """Opens the image in row `index` of a Hugging Face dataset's `column` (Arrow, memory-mapped)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __call__(self, index: int) -> Image.Image:
        return load_image(self.dataset[index][self.column])


class Records(Sequence):
    """A stage's examples held compactly: each one's key, image reference and messages as a JSON line
    in one bytes buffer, with offsets.

    A Python list of 665k examples' dicts and strings costs gigabytes, and every forked DataLoader
    worker copies the pages whose reference counts it touches; one numpy buffer is shared untouched.
    `skipped` counts the records that could not become examples, by reason.
    """

    def __init__(self, rows: Iterable[tuple[str, object, list[dict]]], images: Callable | None = None,
                 skipped: collections.Counter | None = None):
        lines, keys = bytearray(), bytearray()
        line_ends, key_ends = [0], [0]
        for key, image, messages in rows:
            lines += json.dumps([image, messages]).encode()
            keys += key.encode()
            line_ends.append(len(lines))
            key_ends.append(len(keys))
        self._lines, self._line_ends = np.frombuffer(bytes(lines), np.uint8), np.array(line_ends, np.int64)
        self._keys, self._key_ends = np.frombuffer(bytes(keys), np.uint8), np.array(key_ends, np.int64)
        self.images = images
        self.skipped = skipped or collections.Counter()

    def __len__(self) -> int:
        return len(self._line_ends) - 1

    def key(self, index: int) -> str:
        return self._keys[self._key_ends[index]: self._key_ends[index + 1]].tobytes().decode()

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Example:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        image, messages = json.loads(self._lines[self._line_ends[index]: self._line_ends[index + 1]].tobytes())
        load = None if image is None else functools.partial(self.images, image)
        return Example(self.key(index), load, messages)


def load_examples(source: DataSource, stage: str) -> Records:
    loaders = {"easy_vqa": _easy_vqa, "llava": _llava, "hf": _hugging_face}
    return loaders[source.kind](source, stage)


def check_source(source: DataSource, stage: str) -> None:
    """Fail on missing paths before any model loads."""
    if source.kind == "llava":
        if not source.path or not Path(source.path).is_file():
            raise ConfigError(f"data.{stage}.path={source.path!r}: the LLaVA JSON file does not exist")
        if not source.image_root or not Path(source.image_root).is_dir():
            raise ConfigError(f"data.{stage}.image_root={source.image_root!r}: the image folder does not exist")
    elif source.kind == "hf":
        if not source.path:
            raise ConfigError(f"data.{stage}.path is required for kind hf: a hub id or a local file/folder")
        needed = ("image", "caption") if stage == "align" else ("image", "question", "answer")
        missing = [role for role in needed if role not in source.columns]
        if missing:
            raise ConfigError(
                f"data.{stage}.columns needs {', '.join(missing)}: map each role to a dataset column, "
                f"e.g. data.{stage}.columns.{missing[0]}=<column name>"
            )
    elif source.kind == "easy_vqa" and source.split == "test":
        raise ConfigError(f"data.{stage}.split=test: easy-VQA's test split is for `vlm eval`, never for training")


def _file_key(path: Path) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return f"{os.path.abspath(path)}:missing"
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _limited(rows: Iterable, limit: int) -> Iterable:
    return itertools.islice(rows, limit) if limit else rows


def _easy_vqa(source: DataSource, stage: str) -> Records:
    records = easy_vqa_questions(source.split)
    paths = {r["image_id"]: r["image"] for r in records}
    if stage == "align":
        rows = [(_file_key(Path(paths[i])), paths[i], [_user(CAPTION_PROMPT, True), _assistant(c)])
                for i, c in sorted(describe(records).items())]
        return Records(_limited(rows, source.limit), FileImages())
    by_image = collections.defaultdict(list)
    for r in records:
        by_image[r["image_id"]].append(r)
    rows = []
    for image_id, questions in sorted(by_image.items()):
        key = _file_key(Path(paths[image_id]))
        for start in range(0, len(questions), EASY_VQA_TURNS):
            messages = []
            for turn, r in enumerate(questions[start: start + EASY_VQA_TURNS]):
                messages += [_user(f"{r['question']}\n{SHORT_ANSWER}", turn == 0), _assistant(r["answer"])]
            rows.append((key, paths[image_id], messages))
    # The dataset lists each image's questions together; interleave so a prefix (data limit) spans many images.
    random.Random(0).shuffle(rows)
    return Records(_limited(rows, source.limit), FileImages())


def _llava(source: DataSource, stage: str) -> Records:
    try:
        with open(source.path, "rb") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.{stage}.path={source.path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ConfigError(f"data.{stage}.path={source.path}: a LLaVA JSON holds a list of records, not a "
                          f"{type(records).__name__}")
    root = Path(source.image_root)
    skipped: collections.Counter = collections.Counter()

    def rows():
        for record in records:
            parsed = _parse_llava_record(record)
            if isinstance(parsed, str):
                skipped[parsed] += 1
                continue
            image, messages = parsed
            yield ("" if image is None else _file_key(root / image)), image, messages

    # The parsed JSON, the largest transient of a run, is freed on return, before any worker forks.
    return Records(_limited(rows(), source.limit), FileImages(root), skipped)


def _parse_llava_record(record) -> tuple[str | None, list[dict]] | str:
    """(image path or None, chat messages), or the reason the record cannot be trained on."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        return "no conversations"
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversation):
        return "a turn without a text value"
    # `from` can be any JSON, lists and objects included; a speaker we do not know has no place in the template.
    if not all(isinstance(t.get("from"), str) and t["from"] in ROLES for t in conversation):
        return "a turn from neither human nor gpt"
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image or "\0" in image):
        return "image is not a file name"
    try:
        # A lone surrogate (a truncated emoji escape) parses as JSON, but no tokenizer or file system takes it.
        "".join([image or "", *(t["value"] for t in conversation)]).encode()
    except UnicodeEncodeError:
        return "text that is not valid Unicode"
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversation]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no answer turn"
    if next(m["role"] for m in messages if m["role"] != "system") != "user":
        return "an answer before the first question"  # the image goes in the first question; answers follow one
    if not all(a.strip() for a in answers):
        return "an empty answer"  # it would teach the model to stop before saying anything
    if image is None:
        messages = [_strip_image_token(m) for m in messages]
        # "<ima<image>ge>" still reads "<image>" once stripped: an image slot with no image to fill it.
        if any(IMAGE_TOKEN in m["content"] for m in messages):
            return "an <image> placeholder in a record without an image"
        return None, messages
    if sum(m["content"].count(IMAGE_TOKEN) for m in messages) > 1:
        return "several <image> placeholders for one image"
    return image, with_image_placeholder(messages)


def _hugging_face(source: DataSource, stage: str) -> Records:
    import datasets

    path = Path(source.path)
    try:
        if path.suffix in LOCAL_FORMATS:
            dataset = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split=source.split)
        else:
            dataset = datasets.load_dataset(source.path, split=source.split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConfigError(f"data.{stage}: could not load dataset {source.path!r} split {source.split!r}: {e}") from None
    missing = [c for c in source.columns.values() if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"data.{stage}.columns names {missing}, not columns of {source.path} ({dataset.column_names})"
        )
    cols = source.columns
    fingerprint = hashlib.sha256(f"{source.path}:{source.split}:{dataset._fingerprint}".encode()).hexdigest()[:16]
    texts = dataset.remove_columns([cols["image"]])

    def rows():
        for i, row in enumerate(texts):
            if stage == "align":
                messages = [_user(CAPTION_PROMPT, True), _assistant(_one_answer(row[cols["caption"]]))]
            else:
                messages = [
                    _user(f"{row[cols['question']]}\n{SHORT_ANSWER}", True),
                    _assistant(_one_answer(row[cols["answer"]])),
                ]
            yield f"hf:{fingerprint}:{i}", i, messages

    return Records(_limited(rows(), source.limit), DatasetImages(dataset, cols["image"]))


def _one_answer(value) -> str:
    """A list of human answers or captions becomes its most common entry, as VQA's `multiple_choice_answer` is."""
    if isinstance(value, list):
        texts = [v["answer"] if isinstance(v, dict) else v for v in value]
        return collections.Counter(texts).most_common(1)[0][0] if texts else ""
    return str(value)


def _user(text: str, with_image: bool) -> dict:
    return {"role": "user", "content": f"{IMAGE_TOKEN}\n{text}" if with_image else text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _strip_image_token(message: dict) -> dict:
    return {**message, "content": message["content"].replace(IMAGE_TOKEN, "").strip()}
