"""`vlm eval`: score a checkpoint on a fixed-seed benchmark subset, or compare two results.

Writes, under --output (default <checkpoint>/eval/<benchmark>[-ocr][-cot]):
  results.json      benchmark, split, N, seed, metrics with N and 95% bootstrap interval,
                    checkpoint and config hash, wall time, questions/s, skipped records
  predictions.jsonl one line per scored question: question, answers, prediction, score
  results.md        the same as a markdown table
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from vlm.config import ConfigError
from vlm.metrics import (
    exact_match,
    extract_choice,
    extract_final_answer,
    pope_says_yes,
    pope_scores,
    summarize,
    vqa_accuracy,
)
from vlm.model import (
    CONFIG_FILE,
    check_generation_settings,
    check_inference_dtype,
    default_checkpoint,
    load_model,
    read_checkpoint_config,
    to_accelerator,
)
from vlm.processor import PromptError
from vlm.prompts import SHORT_ANSWER
from vlm.vqa_benchmarks import build_prompt, get_benchmark, select

DEFAULT_MAX_NEW_TOKENS = 16  # LLaVA-1.5's and lmms-eval's budget for short answers
COT_MAX_NEW_TOKENS = 256  # room for the reasoning before the final answer


def run_eval(checkpoint: str | Path | None = None, benchmark: str = "easy_vqa", *, data: str | None = None,
             split: str | None = None, limit: int = 1000, seed: int = 0, batch_size: int = 32,
             max_new_tokens: int | None = None, cot: bool = False, ocr: bool = False,
             output: str | Path | None = None, decoding: str = "dynamic", dtype: str = "auto") -> int:
    """Score `checkpoint` (default: the trained offline run) on a fixed-seed subset of `benchmark`;
    `data` is a local copy instead of the Hub, `limit` 0 takes every question. `decoding`: see
    VisionLanguageModel.generate; `dtype`: see to_accelerator."""
    task = get_benchmark(benchmark)
    if ocr and task.name != "textvqa":
        raise ConfigError("--ocr adds TextVQA's OCR tokens to the prompt; use it with --benchmark textvqa")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens is None:
        max_new_tokens = COT_MAX_NEW_TOKENS if cot else DEFAULT_MAX_NEW_TOKENS
    check_generation_settings(max_new_tokens)
    check_inference_dtype(dtype)
    checkpoint = _checkpoint_dir(checkpoint)
    # The data is opened (and its columns checked) before the model loads, so a wrong path fails fast.
    selection = select(task, data=data, split=split, limit=limit, seed=seed)
    suffix = ("-ocr" if ocr else "") + ("-cot" if cot else "")
    output = Path(output) if output else checkpoint / "eval" / f"{task.name}{suffix}"

    model = load_model(checkpoint, None, announce=lambda m: print(m, file=sys.stderr))
    to_accelerator(model, dtype)
    try:
        model.resolve_decoding(decoding)
    except ValueError as e:
        raise ConfigError(f"--decoding {decoding}: {e}") from None
    start = time.perf_counter()
    items, skipped = generate(model, selection, cot=cot, ocr=ocr, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              decoding=decoding)
    wall = time.perf_counter() - start
    if not items:
        raise ConfigError(
            f"all {len(skipped)} selected records of {task.name} are malformed; first: {skipped[0]['error']}"
        )
    metrics = score(task.metric, items, seed=seed)

    results = {
        "benchmark": task.name,
        "description": task.description,
        "source": selection.source,
        "split": selection.split,
        "n": len(items),
        "n_selected": len(selection),
        "n_skipped": len(skipped),
        "rows_in_split": selection.total,
        "limit": limit,
        "seed": seed,
        "metrics": metrics,
        "prompt": {"chain_of_thought": cot, "ocr_tokens": ocr if task.name == "textvqa" else None,
                   # The instruction after each short-answer question, as the checkpoint was trained with it
                   "short_answer": None if task.multiple_choice or cot else model.config.lm.short_answer_prompt},
        "generation": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "decoding": model.resolve_decoding(decoding),
                       "dtype": str(model.lm.dtype).removeprefix("torch.")},
        "checkpoint": str(checkpoint),
        "config_hash": hashlib.sha256((checkpoint / CONFIG_FILE).read_bytes()).hexdigest(),
        "wall_time_s": round(wall, 3),
        "questions_per_s": round(len(items) / wall, 3) if wall > 0 else None,
        "skipped": skipped,
    }
    write_results(output, results, items)
    if skipped:
        print(
            f"skipped {len(skipped)} malformed record(s); see 'skipped' in {output / 'results.json'}", file=sys.stderr
        )
    print(markdown(results))
    print(f"\nwrote {output}/results.json, predictions.jsonl, results.md", file=sys.stderr)
    return 0


def _checkpoint_dir(checkpoint: str | Path | None) -> Path:
    path = Path(checkpoint) if checkpoint else default_checkpoint()
    if not path.is_dir():
        raise ConfigError(
            f"checkpoint folder {path} does not exist; pass --checkpoint DIR "
            "(train one with `vlm train --config offline`)"
        )
    read_checkpoint_config(path)  # a folder that is no checkpoint fails here, before any data loads
    return path


def generate(model, selection, *, cot: bool, ocr: bool, batch_size: int, max_new_tokens: int,
             num_workers: int | None = None, decoding: str | None = None):
    """Greedy answers for every well-formed record; malformed ones, and ones too long for the LM's
    context, come back in `skipped`.

    DataLoader workers (default: sized from the machine on a GPU, none on a CPU) open images, build
    prompts and encode batches while the model generates the batch before.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from vlm.data.batches import default_workers

    prompts = _Prompts(selection, model, cot=cot, ocr=ocr, max_new_tokens=max_new_tokens)
    workers = default_workers(model.device) if num_workers is None else num_workers
    loader = DataLoader(prompts, batch_size=batch_size, num_workers=workers, collate_fn=prompts.collate,
                        pin_memory=model.device.type == "cuda", prefetch_factor=4 if workers else None)
    items: list[dict] = []
    skipped: list[dict] = []
    desc = selection.benchmark.name
    with torch.no_grad(), tqdm(total=len(selection), desc=desc, unit="q", file=sys.stderr, disable=None) as progress:
        for records, errors, batch in loader:
            skipped += errors
            replies = model.answer(batch, max_new_tokens=max_new_tokens, decoding=decoding) if records else []
            for record, reply in zip(records, replies, strict=True):
                record["prediction"] = extract_final_answer(reply) if cot else reply
                if cot:
                    record["reply"] = reply
                items.append(record)
            progress.update(len(records) + len(errors))
    return items, skipped


class _Prompts:
    """The selection's records with their prompts, checked against the LM's context, and batches of
    them encoded as the model's inputs: the work a DataLoader's workers do off the main process."""

    def __init__(self, selection, model, *, cot: bool, ocr: bool, max_new_tokens: int):
        self.selection, self.model = selection, model
        self.cot, self.ocr, self.max_new_tokens = cot, ocr, max_new_tokens

    def __len__(self) -> int:
        return len(self.selection)

    def __getitem__(self, position: int) -> dict:
        record = self.selection[position]
        if "error" in record:
            return record
        record["prompt"] = build_prompt(record, self.selection.benchmark, cot=self.cot, ocr=self.ocr,
                                        short_answer=self.model.config.lm.short_answer_prompt)
        try:
            self.model.check_prompt_fits(record["image"], self._conversation(record), self.max_new_tokens)
        except PromptError as e:
            return {"index": record["index"], "question_id": record["question_id"], "error": str(e)}
        return record

    def collate(self, records: list[dict]):
        good = [r for r in records if "error" not in r]
        errors = [r for r in records if "error" in r]
        batch = (
            self.model.encode_batch([r["image"] for r in good], [self._conversation(r) for r in good]) if good else {}
        )
        # Only what the results keep travels back to the main process, not the images.
        kept = [{k: v for k, v in r.items() if k not in ("image", "context", "ocr_tokens")} for r in good]
        return kept, errors, batch

    @staticmethod
    def _conversation(record: dict) -> list[dict]:
        return [{"role": "user", "content": record["prompt"]}]


def score(metric: str, items: list[dict], seed: int = 0) -> dict:
    """Per-item scores (stored on each item as "score") and the summary metrics, via vlm.metrics.

    `items` need "prediction" and "answers" (vqa, exact), "label" (pope), or "choices" and
    "label" (choice). Each metric is {"value", "n", "ci95"}: a mean over `n` items with its
    95% percentile-bootstrap interval; POPE's F1, which is not a mean, is bootstrapped as a whole.
    """
    if metric == "vqa":
        for item in items:
            item["score"] = vqa_accuracy(item["prediction"], item["answers"])
        return {"vqa_accuracy": summarize([i["score"] for i in items], seed=seed)}
    if metric == "exact":
        for item in items:
            item["score"] = exact_match(item["prediction"], item["answers"][0])
        return {"exact_match": summarize([i["score"] for i in items], seed=seed)}
    if metric == "choice":
        for item in items:
            item["choice"] = extract_choice(item["prediction"], len(item["choices"]), item["choices"])
            item["score"] = float(item["choice"] == item["label"])
        return {"accuracy": summarize([i["score"] for i in items], seed=seed)}
    if metric == "pope":
        return _pope(items, seed)
    raise ValueError(f"unknown metric kind {metric!r}")


def _pope(items: list[dict], seed: int) -> dict:
    metrics = pope_scores([i["prediction"] for i in items], [i["label"] for i in items], seed=seed)
    for item in items:
        item["says_yes"] = pope_says_yes(item["prediction"])
        item["score"] = float(item["says_yes"] == (item["label"].strip().lower() == "yes"))
    return metrics


def write_results(output: Path, results: dict, items: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(output / "predictions.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    (output / "results.md").write_text(markdown(results) + "\n")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _interval(metric: dict) -> str:
    return "-" if not metric.get("ci95") else f"[{_percent(metric['ci95'][0])}, {_percent(metric['ci95'][1])}]"


def markdown(results: dict) -> str:
    prompt = results["prompt"]
    lines = [
        f"### {results['benchmark']} ({results['split']})",
        "",
        "| metric | value (%) | 95% CI | N |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {_percent(m['value'])} | {_interval(m)} | {m['n']} |" for name, m in results["metrics"].items()
    ]
    ocr = prompt.get("ocr_tokens")
    lines += [
        "",
        f"- data: {results['source']}, {results['n_selected']} of {results['rows_in_split']} questions "
        f"(seed {results['seed']}); {results['n']} scored, {results['n_skipped']} malformed skipped",
        f"- prompt: {_suffixes(prompt.get('short_answer'))}, "
        f"chain of thought {'on' if prompt['chain_of_thought'] else 'off'}"
        + ("" if ocr is None else f", OCR tokens {'in' if ocr else 'not in'} the prompt"),
        f"- generation: greedy, at most {results['generation']['max_new_tokens']} new tokens, "
        f"batch {results['generation']['batch_size']}, {results['generation'].get('decoding', 'dynamic')} decoding",
        f"- checkpoint: {results['checkpoint']} (config sha256 {results['config_hash'][:12]})",
        f"- wall time {results['wall_time_s']:.1f} s, {results['questions_per_s']} questions/s",
    ]
    return "\n".join(lines)


def _suffixes(short_answer: str | None) -> str:
    if short_answer is None or short_answer == SHORT_ANSWER:  # None: multiple choice, or results saved before
        return "LLaVA-1.5 suffixes"
    if not short_answer:
        return "each short-answer question alone, without LLaVA-1.5's instruction"
    return f"short-answer instruction {json.dumps(short_answer)}"


def _read_results(path: str) -> dict:
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    if not file.is_file():
        raise ConfigError(f"--compare: {path} is neither a results.json nor a folder holding one")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--compare: {file} is not valid JSON ({e})") from None
    if not isinstance(results, dict) or "metrics" not in results:
        raise ConfigError(f"--compare: {file} is not a `vlm eval` results.json (no metrics)")
    return results


def compare(path_a: str, path_b: str) -> str:
    """A markdown table with two results side by side (metrics in %, with 95% CI)."""
    a, b = _read_results(path_a), _read_results(path_b)

    def field(results, key):
        value = results.get(key)
        return "-" if value is None else str(value)

    rows = [("file", path_a, path_b)]
    for key in ("benchmark", "split", "n", "n_skipped", "seed", "checkpoint"):
        rows.append((key, field(a, key), field(b, key)))
    rows.append(("config hash", field(a, "config_hash")[:12], field(b, "config_hash")[:12]))
    rows.append(("prompt", json.dumps(a.get("prompt")), json.dumps(b.get("prompt"))))
    for name in dict.fromkeys([*a["metrics"], *b["metrics"]]):
        cells = []
        for results in (a, b):
            metric = results["metrics"].get(name)
            cells.append("-" if metric is None else f"{_percent(metric['value'])} {_interval(metric)}")
        rows.append((name, *cells))
    if (a.get("benchmark"), a.get("split")) != (b.get("benchmark"), b.get("split")):
        rows.append(("note", "different benchmark or split:", "scores are not comparable"))
    lines = ["| | A | B |", "| --- | --- | --- |"]
    lines += [f"| {key} | {x} | {y} |" for key, x, y in rows]
    return "\n".join(lines)
