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
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def load_examples(source: DataSource, stage: str) -> list[Example]:
    loaders = {"easy_vqa": _easy_vqa, "llava": _llava, "hf": _hugging_face}
    examples = loaders[source.kind](source, stage)
    return examples[: source.limit] if source.limit else examples


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
    stat = path.stat() if path.exists() else None
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{path.resolve()}:missing"


def _easy_vqa(source: DataSource, stage: str) -> list[Example]:
    records = easy_vqa_questions(source.split)
    paths = {r["image_id"]: Path(r["image"]) for r in records}
    if stage == "align":
        captions = describe(records)
        return [_example(paths[i], [_user(CAPTION_PROMPT, True), _assistant(c)]) for i, c in sorted(captions.items())]
    by_image = collections.defaultdict(list)
    for r in records:
        by_image[r["image_id"]].append(r)
    examples = []
    for image_id, questions in sorted(by_image.items()):
        for start in range(0, len(questions), EASY_VQA_TURNS):
            messages = []
            for turn, r in enumerate(questions[start: start + EASY_VQA_TURNS]):
                messages += [_user(f"{r['question']}\n{SHORT_ANSWER}", turn == 0), _assistant(r["answer"])]
            examples.append(_example(paths[image_id], messages))
    # The dataset lists each image's questions together; interleave so a prefix (data limit) spans many images.
    random.Random(0).shuffle(examples)
    return examples


def _llava(source: DataSource, stage: str) -> list[Example]:
    try:
        records = json.loads(Path(source.path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"data.{stage}.path={source.path}: not valid JSON ({e})") from None
    root = Path(source.image_root)
    examples = []
    for record in records:
        conversation = record.get("conversations") if isinstance(record, dict) else None
        if not conversation:
            continue  # counted by the caller as malformed via len(records) - len(examples)
        messages = [
            {"role": ROLES.get(turn.get("from"), "user"), "content": turn.get("value", "")} for turn in conversation
        ]
        if "image" in record:
            examples.append(_example(root / record["image"], with_image_placeholder(messages)))
        else:
            examples.append(Example(key="", load=None, messages=[_strip_image_token(m) for m in messages]))
    return examples


def _hugging_face(source: DataSource, stage: str) -> list[Example]:
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
    examples = []
    for i, row in enumerate(texts):
        if stage == "align":
            messages = [_user(CAPTION_PROMPT, True), _assistant(_one_answer(row[cols["caption"]]))]
        else:
            messages = [
                _user(f"{row[cols['question']]}\n{SHORT_ANSWER}", True),
                _assistant(_one_answer(row[cols["answer"]])),
            ]
        examples.append(
            Example(key=f"hf:{fingerprint}:{i}", load=_hf_image_loader(dataset, cols["image"], i), messages=messages)
        )
    return examples


def _hf_image_loader(dataset, column: str, index: int) -> Callable[[], Image.Image]:
    return lambda: load_image(dataset[index][column])


def _one_answer(value) -> str:
    """A list of human answers or captions becomes its most common entry, as VQA's `multiple_choice_answer` is."""
    if isinstance(value, list):
        texts = [v["answer"] if isinstance(v, dict) else v for v in value]
        return collections.Counter(texts).most_common(1)[0][0] if texts else ""
    return str(value)


def _example(path: Path, messages: list[dict]) -> Example:
    return Example(key=_file_key(path), load=lambda: load_image(path), messages=messages)


def _user(text: str, with_image: bool) -> dict:
    return {"role": "user", "content": f"{IMAGE_TOKEN}\n{text}" if with_image else text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _strip_image_token(message: dict) -> dict:
    return {**message, "content": message["content"].replace(IMAGE_TOKEN, "").strip()}
