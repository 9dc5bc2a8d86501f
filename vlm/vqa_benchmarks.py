"""The benchmarks `vlm eval` scores: where each lives, how its rows read, how it is asked.

Every benchmark but easy-VQA is read with `datasets` from the Hub copy that lmms-eval uses, or
from a local override (`--data`): a snapshot folder of that Hub dataset (same configs and splits),
an image folder with a metadata.jsonl, or .parquet / .json / .jsonl / .csv files holding the Hub's
columns, opened as `vlm train` opens them (vlm/data/hub.py). Rows become records
{question_id, image (PIL), question, prompt parts, answers, choices?, label?}; a row that cannot
become one (no image, no question, no answers, a label outside its choices, an unreadable
image) is yielded as {"index", "question_id", "error"} so the runner counts it, never drops it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm.config import ConfigError
from vlm.data.easy_vqa import easy_vqa_questions
from vlm.data.hub import open_dataset
from vlm.images import ImageError, load_image
from vlm.prompts import MULTIPLE_CHOICE, SHORT_ANSWER, short_answer_question

# Chain-of-thought mode replaces LLaVA's direct-answer suffix; the final line is then
# read back with vlm.metrics.extract_final_answer.
COT_SHORT_ANSWER = (
    "Think step by step, then give the final answer as a single word or phrase "
    "on the last line, written as 'Answer: <answer>'."
)
COT_MULTIPLE_CHOICE = (
    "Think step by step, then give the letter of the correct option "
    "on the last line, written as 'Answer: <letter>'."
)

METRIC_KINDS = ("vqa", "exact", "pope", "choice")


class Malformed(ValueError):
    """A dataset row that cannot be scored; the message says what is wrong with it."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    hub_id: str | None  # None: the packaged easy-VQA dataset
    config: str | None
    split: str
    columns: tuple[str, ...]  # the dataset columns `read` uses; checked before any model loads
    read: Callable[[dict, int], dict]  # row, row index -> record fields (raises Malformed)
    metric: str  # one of METRIC_KINDS
    images_config: str | None = None  # GQA: images live in a second config, joined on imageId
    category: str | None = None  # POPE: the value of the `category` column this benchmark keeps

    @property
    def multiple_choice(self) -> bool:
        return self.metric == "choice"


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise Malformed(f"empty or missing {column!r}")
    return value.strip()


def _answers(values) -> list[str]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise Malformed("no ground-truth answers")
    return values


def _read_easy_vqa(row: dict, index: int) -> dict:
    return {"question_id": row["question_id"], "question": _text(row, "question"),
            "answers": _answers([row.get("answer")])}


def _read_vqav2(row: dict, index: int) -> dict:
    answers = row.get("answers")
    if not isinstance(answers, list):
        raise Malformed("no ground-truth answers")
    return {"question_id": row["question_id"], "question": _text(row, "question"),
            "answers": _answers([a.get("answer") if isinstance(a, dict) else None for a in answers])}


def _read_gqa(row: dict, index: int) -> dict:
    return {"question_id": row["id"], "question": _text(row, "question"), "answers": _answers([row.get("answer")])}


def _read_textvqa(row: dict, index: int) -> dict:
    tokens = row.get("ocr_tokens") or []
    return {"question_id": row["question_id"], "question": _text(row, "question"),
            "answers": _answers(row.get("answers")), "ocr_tokens": [str(t) for t in tokens]}


def _read_pope(row: dict, index: int) -> dict:
    label = str(row.get("answer") or "").strip().lower()
    if label not in ("yes", "no"):
        raise Malformed(f"POPE answer must be 'yes' or 'no', got {row.get('answer')!r}")
    return {"question_id": row["question_id"], "question": _text(row, "question"), "answers": [label], "label": label}


def _letter(index: int) -> str:
    return chr(ord("A") + index)


def _choice_record(question_id, question: str, choices: list[str], label: str, context: str = "") -> dict:
    if len(choices) < 2:
        raise Malformed(f"{len(choices)} choice(s); a multiple-choice question needs at least 2")
    if label not in [_letter(i) for i in range(len(choices))]:
        raise Malformed(f"answer {label!r} is not one of the {len(choices)} options")
    return {"question_id": question_id, "question": question, "choices": choices, "label": label,
            "answers": [label], "context": context}


def _read_scienceqa(row: dict, index: int) -> dict:
    # The Hub copy has no id column; the row's position in its split identifies it.
    choices = row.get("choices")
    answer = row.get("answer")
    if not isinstance(choices, list) or not isinstance(answer, int):
        raise Malformed("missing choices or answer index")
    hint = row.get("hint") or ""
    return _choice_record(index, _text(row, "question"), [str(c) for c in choices],
                          _letter(answer) if 0 <= answer < 26 else str(answer), context=hint.strip())


_OPTION = re.compile(r"(?:^|,\s*|\n\s*)([A-Z]):\s")


def mmstar_options(question: str) -> list[str]:
    """Option texts of an MMStar question, which lists them inline: "...\\nOptions: A: x, B: y"."""
    _, found, listing = question.rpartition("Options:")
    if not found:
        return []
    marks = [m for m in _OPTION.finditer(listing.strip())]
    # Keep only the run A, B, C, ... so a "B: " inside an option's text cannot start a new one.
    run = []
    for mark in marks:
        if mark.group(1) == _letter(len(run)):
            run.append(mark)
    text = listing.strip()
    return [text[m.end(): run[i + 1].start() if i + 1 < len(run) else len(text)].strip()
            for i, m in enumerate(run)]


def _read_mmstar(row: dict, index: int) -> dict:
    question = _text(row, "question")
    return _choice_record(
        row["index"], question, mmstar_options(question), str(row.get("answer") or "").strip().upper()
    )


def _pope(category: str) -> Benchmark:
    return Benchmark(
        name=f"pope_{category}", description=f"POPE object hallucination, {category} negatives (COCO val2014)",
        hub_id="lmms-lab/POPE", config=None, split="test", columns=("question_id", "question", "answer", "category"),
        read=_read_pope, metric="pope", category=category,
    )


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("easy_vqa", "easy-VQA (packaged, offline): one coloured shape per image, single-word answers",
              None, None, "test", ("question_id", "question", "answer"), _read_easy_vqa, "vqa"),
    Benchmark("vqav2", "VQAv2 val: 10 human answers per question, official VQA accuracy",
              "lmms-lab/VQAv2", None, "validation", ("question_id", "question", "answers"), _read_vqav2, "vqa"),
    Benchmark("gqa", "GQA testdev balanced: exact match after VQA answer normalisation",
              "lmms-lab/GQA", "testdev_balanced_instructions", "testdev", ("id", "imageId", "question", "answer"),
              _read_gqa, "exact", images_config="testdev_balanced_images"),
    Benchmark("textvqa", "TextVQA val: reading text in images, official VQA accuracy (--ocr adds OCR tokens)",
              "lmms-lab/textvqa", None, "validation", ("question_id", "question", "answers", "ocr_tokens"),
              _read_textvqa, "vqa"),
    _pope("random"),
    _pope("popular"),
    _pope("adversarial"),
    Benchmark("scienceqa_img", "ScienceQA-IMG test: science multiple choice with an image",
              "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", ("question", "choices", "answer", "hint"),
              _read_scienceqa, "choice"),
    Benchmark("mmstar", "MMStar val: vision-indispensable multiple choice, options listed in the question",
              "Lin-Chen/MMStar", None, "val", ("index", "question", "answer"), _read_mmstar, "choice"),
]}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        close = difflib.get_close_matches(name, BENCHMARKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown benchmark {name!r}; {hint}available: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def build_prompt(record: dict, benchmark: Benchmark, *, cot: bool = False, ocr: bool = False,
                 short_answer: str = SHORT_ANSWER) -> str:
    """The user turn, as LLaVA-1.5 / lmms-eval ask it (without the image placeholder); `short_answer` replaces
    LLaVA's short-answer instruction for a model trained with another (model.lm.short_answer_prompt)."""
    if benchmark.multiple_choice:
        context = f"Context: {record['context']}\n" if record.get("context") else ""
        question = record["question"]
        if benchmark.name != "mmstar":  # MMStar's question already lists its options
            options = "\n".join(f"{_letter(i)}. {choice}" for i, choice in enumerate(record["choices"]))
            question = f"{question}\n{options}"
        return f"{context}{question}\n{COT_MULTIPLE_CHOICE if cot else MULTIPLE_CHOICE}"
    reference = f"\nReference OCR token: {', '.join(record['ocr_tokens'])}" if ocr else ""
    return short_answer_question(f"{record['question']}{reference}", COT_SHORT_ANSWER if cot else short_answer)


@dataclass
class Selection:
    """A fixed-seed subset of one benchmark split, read lazily."""

    benchmark: Benchmark
    source: str  # hub id, local path, or "easy-vqa (packaged)"
    split: str
    total: int  # rows in the split (after POPE's category filter)
    indices: list[int]  # positions in the split, ascending
    _row: Callable[[int], dict]
    _image: Callable[[dict], object]
    _base_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, position: int) -> dict:
        """The record at `position` of the subset with its image opened, or {index, question_id, error}.
        Random access lets a DataLoader's workers open images while the model generates."""
        index = self.indices[position]
        row = self._row(index)
        try:
            record = self.benchmark.read(row, index)
            image = self._image(row)
            if image is None:
                raise Malformed("no image")
            record["image"] = load_image(_image_source(image, self._base_dir))
        except (Malformed, ImageError) as e:
            reason = f"unreadable image ({e})" if isinstance(e, ImageError) else str(e)
            return {
                "index": index,
                "question_id": _plain(row.get("question_id", row.get("id", index))),
                "error": reason,
            }
        except (KeyError, TypeError, AttributeError) as e:
            return {"index": index, "question_id": index, "error": f"unexpected row layout ({type(e).__name__}: {e})"}
        record["index"] = index
        record["question_id"] = _plain(record["question_id"])
        return record


def _plain(value):
    return value if isinstance(value, (int, str)) else str(value)


def _image_source(value, base_dir: Path | None):
    """A datasets Image cell ({"bytes", "path"}) or a path string, as something load_image opens."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if not value:
            raise Malformed("no image")
    if isinstance(value, str) and base_dir is not None and not Path(value).is_absolute():
        return str(base_dir / value)
    return value


def subset_indices(total: int, limit: int, seed: int) -> list[int]:
    """`limit` distinct positions out of `total`, the same for the same seed; all when limit is 0 or >= total."""
    if limit < 0:
        raise ConfigError(f"--limit must be 0 (all) or a positive number of questions, got {limit}")
    if limit == 0 or limit >= total:
        return list(range(total))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=limit, replace=False))


def select(benchmark: Benchmark, *, data: str | None = None, split: str | None = None,
           limit: int = 0, seed: int = 0) -> Selection:
    """Open the benchmark split (Hub or `data`), check its columns, and pick the fixed-seed subset."""
    split = split or benchmark.split
    if benchmark.hub_id is None:
        if data:
            raise ConfigError(
                f"{benchmark.name} is the packaged dataset; --data applies to the Hugging Face benchmarks"
            )
        rows = easy_vqa_questions(split)
        indices = subset_indices(len(rows), limit, seed)
        return Selection(benchmark, "easy-vqa (packaged)", split, len(rows), indices,
                         rows.__getitem__, lambda row: row["image"])

    import datasets

    source = data or benchmark.hub_id
    dataset = _load(source, benchmark.config, split, benchmark.name)
    _check_columns(dataset, benchmark, source)
    image_of = _image_reader(dataset, benchmark, source, split)
    dataset = dataset.cast_column("image", datasets.Image(decode=False)) if "image" in dataset.column_names else dataset
    positions = list(range(len(dataset)))
    if benchmark.category:
        positions = [i for i, c in enumerate(dataset["category"]) if c == benchmark.category]
        if not positions:
            raise ConfigError(f"{source} has no rows with category {benchmark.category!r}; is it the POPE dataset?")
    chosen = subset_indices(len(positions), limit, seed)
    path = Path(source)
    base_dir = (path.parent if path.is_file() else path) if path.exists() else None
    return Selection(benchmark, source, split, len(positions), [positions[i] for i in chosen],
                     dataset.__getitem__, image_of, base_dir)


def _load(source: str, config: str | None, split: str, name: str):
    return open_dataset(source, split, config, context=name, set_path="pass --data PATH", set_split="pass --split NAME")


def _check_columns(dataset, benchmark: Benchmark, source: str) -> None:
    # GQA's images may sit in the rows or come from its second config.
    needed = list(benchmark.columns) + ([] if benchmark.images_config else ["image"])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{source} lacks the column(s) {', '.join(missing)} that {benchmark.name} reads "
            f"(it has {', '.join(dataset.column_names)}); point --data at a copy of {benchmark.hub_id}"
        )


def _image_reader(dataset, benchmark: Benchmark, source: str, split: str) -> Callable[[dict], object]:
    if "image" in dataset.column_names or not benchmark.images_config:
        return lambda row: row.get("image")
    import datasets

    if Path(source).is_file():
        raise ConfigError(
            f"{source} has no image column and GQA keeps its images in the {benchmark.images_config} config; "
            "pass the folder holding both configs (a snapshot of lmms-lab/GQA)"
        )
    images = _load(source, benchmark.images_config, split, benchmark.name)
    images = images.cast_column("image", datasets.Image(decode=False))
    position = {image_id: i for i, image_id in enumerate(images["id"])}

    def image_of(row: dict):
        found = position.get(row.get("imageId"))
        return None if found is None else images[found]["image"]

    return image_of
