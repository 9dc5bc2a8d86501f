"""Training examples from the three source kinds, all as chat messages with one image.

- llava: LLaVA JSON (558k caption records and 665k multi-turn records alike): `image` relative to
  an image root, `conversations` of {"from": "human"|"gpt", "value": ...} with `<image>` in the first human turn.
- hf: a Hugging Face dataset (hub id, or local files: vlm/data/hub.py) as published: LLaVA-style
  `conversations` + `image` (lmms-lab/LLaVA-OneVision-Data), the_cauldron's `texts` + `images`
  (HuggingFaceM4/the_cauldron), both found by their column names, or any dataset through a column mapping:
  image + caption (align) or image + question + answer (instruct).
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
from vlm.data.hub import open_dataset
from vlm.images import ImageError, load_image
from vlm.language_model import IMAGE_TOKEN
from vlm.processor import with_image_placeholder
from vlm.prompts import SHORT_ANSWER, short_answer_question

CAPTION_PROMPT = "Describe the image briefly."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The roles a hf dataset's columns play (data.*.columns maps role -> column), per layout.
LAYOUT_ROLES = {
    "llava": ("conversations", "image"),  # LLaVA turns [{from, value}]; the image may be null (text only)
    "cauldron": ("texts", "images"),  # [{user, assistant, source}] turn pairs; a list of images
    "caption": ("image", "caption"),
    "qa": ("image", "question", "answer"),
}
SEVERAL_IMAGES = "several images"  # an example holds one image; records with more are skipped, counted


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
    """Opens the image in row `index` of a Hugging Face dataset's `column` (Arrow, memory-mapped), or the
    first of a list of images (the_cauldron's `images`: rows with more never become examples)."""

    def __init__(self, dataset, column: str):
        # Raw Arrow cells, opened by load_image: a corrupt image is an ImageError, which batches count and skip.
        self.cells = dataset.select_columns([column]).with_format("arrow")

    def __call__(self, index: int) -> Image.Image:
        cell = self.cells[index].column(0)[0].as_py()
        if isinstance(cell, list):
            cell = cell[0] if cell else None
        if isinstance(cell, dict):  # the datasets Image feature's storage
            cell = cell.get("bytes") or cell.get("path")
        if not cell:
            raise ImageError(f"row {index} of the dataset has no image")
        return load_image(cell)


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


def load_examples(source: DataSource, stage: str, short_answer_prompt: str = SHORT_ANSWER) -> Records:
    """The stage's records; `short_answer_prompt` (model.lm.short_answer_prompt) follows each question that
    easy_vqa and hf question/answer columns bring; LLaVA JSON and conversation columns keep their own text."""
    if source.kind == "llava":
        return _llava(source, stage)
    return (_easy_vqa if source.kind == "easy_vqa" else _hugging_face)(source, stage, short_answer_prompt)


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
        if source.columns:  # without a mapping, the layout is found from the dataset's columns once it is open
            _mapped_layout(source.columns, stage)
    elif source.kind == "easy_vqa" and source.split == "test":
        raise ConfigError(f"data.{stage}.split=test: easy-VQA's test split is for `vlm eval`, never for training")
    if source.turns < 1:
        raise ConfigError(f"data.{stage}.turns={source.turns}: a conversation needs at least 1 question")
    if source.described and (source.kind != "easy_vqa" or stage != "instruct"):
        raise ConfigError(f"data.{stage}.described is for easy_vqa questions (data.instruct), where each picture has "
                          "a caption to put in words; leave it at 0 here")
    if not 0 <= source.described < 1:
        raise ConfigError(f"data.{stage}.described={source.described}: a share of conversations from 0 up to, "
                          "not including, 1 (some must show the picture)")


def _file_key(path: Path) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return f"{os.path.abspath(path)}:missing"
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _limited(rows: Iterable, limit: int) -> Iterable:
    return itertools.islice(rows, limit) if limit else rows


def _easy_vqa(source: DataSource, stage: str, short_answer_prompt: str) -> Records:
    records = easy_vqa_questions(source.split)
    paths = {r["image_id"]: r["image"] for r in records}
    if stage == "align":
        rows = [(_file_key(Path(paths[i])), paths[i], [_user(CAPTION_PROMPT, True), _assistant(c)])
                for i, c in sorted(describe(records).items())]
        return Records(_limited(rows, source.limit), FileImages())
    by_image = collections.defaultdict(list)
    for r in records:
        by_image[r["image_id"]].append(r)
    captions = describe(records) if source.described else {}
    rows = []
    for image_id, questions in sorted(by_image.items()):
        key = _file_key(Path(paths[image_id]))
        for start in range(0, len(questions), source.turns):
            messages = []
            for turn, r in enumerate(questions[start: start + source.turns]):
                messages += [_user(short_answer_question(r["question"], short_answer_prompt), turn == 0),
                             _assistant(r["answer"])]
            rows.append((key, paths[image_id], messages, captions.get(image_id)))
    # The dataset lists each image's questions together; interleave so a prefix (data limit) spans many images.
    random.Random(0).shuffle(rows)
    in_words = random.Random(1)
    rows = [("", None, _in_words(messages, caption)) if caption and in_words.random() < source.described
            else (key, path, messages) for key, path, messages, caption in rows]
    return Records(_limited(rows, source.limit), FileImages())


def _in_words(messages: list[dict], caption: str) -> list[dict]:
    """The conversation with its picture put in words: the caption where the image would be."""
    first, *rest = messages
    return [{**first, "content": first["content"].replace(IMAGE_TOKEN, caption, 1)}, *rest]


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
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image or "\0" in image):
        return "image is not a file name"
    try:
        (image or "").encode()  # a lone surrogate parses as JSON, but no file system takes it
    except UnicodeEncodeError:
        return "text that is not valid Unicode"
    messages = conversation_messages(record.get("conversations"), has_image=image is not None)
    return messages if isinstance(messages, str) else (image, messages)


def conversation_messages(turns, has_image: bool) -> list[dict] | str:
    """LLaVA turns ({"from", "value"}) as chat messages with `<image>` where LLaVA puts it, or the reason they
    cannot be trained on. LLaVA JSON records and Hugging Face datasets in either conversation layout go through
    here, so every source follows the same rules and counts the same skip reasons."""
    if not isinstance(turns, list) or not turns:
        return "no conversations"
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        return "a turn without a text value"
    # `from` can be any JSON, lists and objects included; a speaker we do not know has no place in the template.
    if not all(isinstance(t.get("from"), str) and t["from"] in ROLES for t in turns):
        return "a turn from neither human nor gpt"
    try:
        # A lone surrogate (a truncated emoji escape) parses as JSON, but no tokenizer takes it.
        "".join(t["value"] for t in turns).encode()
    except UnicodeEncodeError:
        return "text that is not valid Unicode"
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in turns]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no answer turn"
    if next(m["role"] for m in messages if m["role"] != "system") != "user":
        return "an answer before the first question"  # the image goes in the first question; answers follow one
    if not all(a.strip() for a in answers):
        return "an empty answer"  # it would teach the model to stop before saying anything
    if not has_image:
        messages = [_strip_image_token(m) for m in messages]
        # "<ima<image>ge>" still reads "<image>" once stripped: an image slot with no image to fill it.
        if any(IMAGE_TOKEN in m["content"] for m in messages):
            return "an <image> placeholder in a record without an image"
        return messages
    if sum(m["content"].count(IMAGE_TOKEN) for m in messages) > 1:
        return SEVERAL_IMAGES
    return with_image_placeholder(messages)


def _hugging_face(source: DataSource, stage: str, short_answer_prompt: str) -> Records:
    dataset = open_dataset(source.path, source.split, source.config, context=f"data.{stage}",
                           set_path=f"set data.{stage}.path=PATH", set_split=f"set data.{stage}.split=NAME",
                           set_config=f"set data.{stage}.config=NAME")
    columns = source.columns or _detected_columns(dataset.column_names, source.path, stage)
    layout = _mapped_layout(columns, stage)
    missing = [c for c in columns.values() if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"data.{stage}.columns names {missing}, not columns of {source.path} ({dataset.column_names})"
        )
    image_column = columns.get("images" if layout == "cauldron" else "image")
    counts = _image_counts(dataset, image_column) if image_column else np.zeros(len(dataset), np.int64)
    fingerprint = hashlib.sha256(f"{source.path}:{source.split}:{dataset._fingerprint}".encode()).hexdigest()[:16]
    texts = dataset.select_columns([c for role, c in columns.items() if role not in ("image", "images")])
    skipped: collections.Counter = collections.Counter()

    def rows():
        for i, row in enumerate(texts):
            messages = _row_messages(layout, {role: row[c] for role, c in columns.items() if c in row}, int(counts[i]),
                                     short_answer_prompt)
            if isinstance(messages, str):
                skipped[messages] += 1
                continue
            yield (f"hf:{fingerprint}:{i}", i, messages) if counts[i] else ("", None, messages)

    return Records(_limited(rows(), source.limit), DatasetImages(dataset, image_column) if image_column else None,
                   skipped)


def _detected_columns(names: list[str], path: str, stage: str) -> dict[str, str]:
    for layout in ("llava", "cauldron"):
        if set(LAYOUT_ROLES[layout]) <= set(names):
            return {role: role for role in LAYOUT_ROLES[layout]}
    needed = LAYOUT_ROLES["caption" if stage == "align" else "qa"]
    raise ConfigError(
        f"data.{stage}.columns needs {', '.join(needed)}: map each role to a dataset column, e.g. "
        f"data.{stage}.columns.{needed[0]}=<column name> ({path} has {', '.join(names)}; datasets with "
        "conversations + image or texts + images columns need no mapping)"
    )


def _mapped_layout(columns: dict[str, str], stage: str) -> str:
    """The layout a role -> column mapping asks for: the conversation layouts by their text role, else
    captions (align) or questions (instruct). A conversation layout's image role may be left out (text only)."""
    layout = ("llava" if "conversations" in columns else "cauldron" if "texts" in columns
              else "caption" if stage == "align" else "qa")
    roles = LAYOUT_ROLES[layout]
    required = roles[:1] if layout in ("llava", "cauldron") else roles
    missing = [role for role in required if role not in columns]
    if missing:
        raise ConfigError(
            f"data.{stage}.columns needs {', '.join(missing)}: map each role to a dataset column, "
            f"e.g. data.{stage}.columns.{missing[0]}=<column name>"
        )
    unknown = [role for role in columns if role not in roles]
    if unknown:
        raise ConfigError(f"data.{stage}.columns.{unknown[0]}: not a role of the {layout} layout, whose roles are "
                          f"{', '.join(roles)}")
    return layout


def _image_counts(dataset, column: str) -> np.ndarray:
    """Images in each row, from the Arrow column's validity and list lengths: no image is read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = dataset.select_columns([column]).with_format("arrow")[:].column(0)
    if pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type):
        return pc.fill_null(pc.list_value_length(cells), 0).to_numpy()
    return pc.cast(pc.is_valid(cells), pa.int64()).to_numpy()


def _row_messages(layout: str, row: dict, images: int, short_answer_prompt: str) -> list[dict] | str:
    """A hf row's chat messages (roles -> values), or the reason it cannot be trained on."""
    if images > 1:
        return SEVERAL_IMAGES
    if layout == "llava":
        return conversation_messages(row["conversations"], has_image=images == 1)
    if layout == "cauldron":
        return conversation_messages(_cauldron_turns(row["texts"]), has_image=images == 1)
    if not images:
        return "no image"
    if layout == "caption":
        return [_user(CAPTION_PROMPT, True), _assistant(_one_answer(row["caption"]))]
    return [_user(short_answer_question(row["question"], short_answer_prompt), True),
            _assistant(_one_answer(row["answer"]))]


def _cauldron_turns(texts):
    """the_cauldron's {user, assistant} pairs as LLaVA turns (anything else as it is, for the same skip reasons)."""
    if not isinstance(texts, list):
        return texts
    return [{"from": speaker, "value": pair.get(key) if isinstance(pair, dict) else None}
            for pair in texts for speaker, key in (("human", "user"), ("gpt", "assistant"))]


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
