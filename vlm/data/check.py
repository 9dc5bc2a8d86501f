"""`vlm data check`: what each stage's records become in training, found before any GPU time is spent.

Per stage it shows examples encoded exactly as training encodes them (supervised tokens marked), whether
every answer ends with the chat template's end-of-turn token inside its labels, token lengths against
data.max_length, records skipped and why, images that do not open, image tokens per example, and the
stage's optimizer steps. Only the tokenizer loads: image tokens come from the towers' configurations.

Fatal findings, one line each, make `vlm data check` exit 1; `vlm train` checks a sample of each stage
(TRAIN_SAMPLE records) before any model loads and stops on the same lines:
- a class of records (with an image, text only) none of which has a supervised token: the template leaves
  their answers out of the labels, so they train nothing;
- the end-of-turn token never supervised: the model would never learn to end its answers;
- data.max_length leaving more than ANSWERLESS_LIMIT of the records without an answer token: training
  drops them. Below the limit, the few overlong conversations are skipped and counted in the run report.
"""

from __future__ import annotations

import collections
import itertools
import sys
from dataclasses import dataclass, field

import numpy as np

from vlm.config import Config, ConfigError, StageConfig
from vlm.data.batches import REASONS, LengthGroupedBatchSampler, TokenizedExamples, optimizer_steps, split_holdout
from vlm.data.sources import Records
from vlm.images import ImageError
from vlm.language_model import load_tokenizer, stop_token_ids
from vlm.processor import IGNORE_INDEX, PromptError, VLMProcessor
from vlm.projector import Projector
from vlm.vision import num_patches
from vlm.vqa_benchmarks import subset_indices

TRAIN_SAMPLE = 200  # records per stage `vlm train` checks: under a second of encoding per stage
CHECK_SAMPLE = 2000  # records per stage `vlm data check` measures by default
ANSWERLESS_LIMIT = 0.01  # share of records data.max_length may leave without an answer token
CLASSES = {True: "with an image", False: "text only"}
GREEN, RESET = "\x1b[32m", "\x1b[0m"


@dataclass
class StageCheck:
    name: str
    records: Records
    sampled: np.ndarray  # positions in records
    full: TokenizedExamples  # the sample encoded without max_length: what the template makes of it
    trained: TokenizedExamples  # the sample as training encodes it
    stops: str  # the end-of-turn tokens, by name
    answers: int = 0  # supervised spans in `full`, one per answer
    ended: int = 0  # those holding an end-of-turn token
    answerless: int = 0  # records with answers that data.max_length leaves without one
    fatal: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def stop_on_fatal_findings(config: Config, records: dict[str, Records]) -> None:
    """`vlm train`'s check: a sample of each stage, encoded as training will encode it; ConfigError with one
    line per fatal finding."""
    processor, stops = data_processor(config)
    fatal = [line for name, stage_records in records.items()
             for line in check_stage(config, name, stage_records, processor, stops, TRAIN_SAMPLE).fatal]
    if fatal:
        raise ConfigError("\n".join(fatal))


def data_check(config: Config, records: dict[str, Records], *, examples: int = 3, sample: int = CHECK_SAMPLE,
               all_images: bool = False) -> int:
    """`vlm data check`: the report on stdout, fatal findings on stderr, one line each; 1 if there are any."""
    if examples < 0 or sample < 0:
        raise ConfigError("--examples and --sample take 0 or a positive number")
    processor, stops = data_processor(config)
    color = sys.stdout.isatty()
    fatal = []
    for name, stage_records in records.items():
        check = check_stage(config, name, stage_records, processor, stops, sample)
        describe_stage(check, config, processor, examples, color)
        check_images(check, examples * 10, all_images, config.train.seed)
        print("\n".join(check.lines))
        fatal += check.fatal
    for line in fatal:
        print(f"vlm data check: {line}", file=sys.stderr)
    return 1 if fatal else 0


def data_processor(config: Config) -> tuple[VLMProcessor, set[int]]:
    """The processor training encodes with, from the tokenizer and the towers' configurations alone; and the
    tokens that end generation."""
    tokenizer = load_tokenizer(config.model.lm)
    tokens = Projector(config.model.projector, 1, 1, num_patches(config.model.vision)).num_tokens
    processor = VLMProcessor(tokenizer, image_transform=None, num_image_tokens=tokens,  # encoding opens no image
                             system_prompt=config.model.lm.system_prompt)
    return processor, stop_token_ids(config.model.lm, tokenizer)


def check_stage(config: Config, name: str, records: Records, processor: VLMProcessor, stops: set[int],
                sample: int) -> StageCheck:
    """Encode up to `sample` records (0: all) with and without data.max_length, and find the fatal problems."""
    sampled = np.asarray(subset_indices(len(records), sample, config.train.seed), dtype=np.int64)
    names = ", ".join(processor.tokenizer.convert_ids_to_tokens(sorted(stops)))
    check = StageCheck(name, records, sampled,
                       TokenizedExamples(records, sampled, processor, max_length=None),
                       TokenizedExamples(records, sampled, processor, config.data.max_length), names)
    where, n = f"data.{name}", len(sampled)
    unencodable = np.flatnonzero(check.full.reasons == 1)  # without max_length, only the template fails
    if len(unencodable):
        try:
            processor.encode(records[int(sampled[unencodable[0]])].messages)
        except PromptError as e:
            check.fatal.append(f"{where}: {len(unencodable)} of {n} sampled records cannot be encoded: {e}")
    supervised = np.array([_supervised_count(check.full, i) > 0 for i in range(n)], dtype=bool)
    has_image = np.array([bool(records.key(int(i))) for i in sampled], dtype=bool)
    for with_image, label in CLASSES.items():
        members = (has_image == with_image) & (check.full.reasons != 1)
        if members.any() and not supervised[members].any():
            check.fatal.append(
                f"{where}: none of the {members.sum()} sampled records {label} has a supervised token: the chat "
                "template leaves their answers out of the labels, so they would train nothing"
            )
    check.answers, check.ended = _answers_ending(check.full, stops)
    if check.answers and not check.ended:
        check.fatal.append(
            f"{where}: the end-of-turn token ({names}) is never supervised: the chat template writes it outside "
            "the assistant's answer, so the model would never learn to stop; pick an LM whose template ends the "
            "assistant turn with it"
        )
    check.answerless = int(((check.trained.reasons != 0) & supervised).sum())
    if n and check.answerless / n > ANSWERLESS_LIMIT:
        check.fatal.append(
            f"{where}: data.max_length={config.data.max_length} leaves {check.answerless} of {n} sampled records "
            f"({check.answerless / n:.1%}) without an answer token to train on, more than {ANSWERLESS_LIMIT:.0%}; "
            "raise data.max_length or compress image tokens (model.projector.compress)"
        )
    return check


def describe_stage(check: StageCheck, config: Config, processor: VLMProcessor, examples: int, color: bool) -> None:
    source, stage = getattr(config.data, check.name), getattr(config.train, check.name)
    records, n = check.records, len(check.sampled)
    full, trained, max_length = check.full, check.trained, config.data.max_length
    where = f"{source.kind} {source.path}" if source.path else source.kind
    lines = check.lines
    lines.append(f"== data.{check.name}: {where}, {len(records):,} records; "
                 f"{n:,} {'sampled' if n < len(records) else 'checked'}")
    shown = [i for i in range(n) if full.reasons[i] != 1][:examples]
    marks = "green" if color else "[[ ]]"
    for k, i in enumerate(shown):
        header = f"-- example {k + 1} of {len(shown)} (record {int(check.sampled[i])}), "
        # One that training drops is shown whole, so the reason can be seen.
        seen, how = ((trained, f"as training sees it ({marks}: supervised)") if trained.reasons[i] == 0 else
                     (full, f"dropped by training ({REASONS[trained.reasons[i]]}), shown whole ({marks}: supervised)"))
        lines += [header + how + ":", render(seen.encoded(i).input_ids, seen.encoded(i).labels, processor, color)]
    if check.answers == check.ended:
        lines.append(f"end of turn: all {check.answers:,} answers end with {check.stops} inside their labels")
    elif check.ended:
        lines.append(f"end of turn: {check.answers - check.ended:,} of {check.answers:,} answers have no "
                     f"{check.stops} in their labels; the model learns to stop from the others only")
    else:
        lines.append(f"end of turn: none of the {check.answers:,} answers has {check.stops} in its labels")
    lengths = np.array([full.length(i) for i in range(n) if full.reasons[i] != 1])
    if len(lengths):
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
        lines.append(f"tokens per record: p50 {p50}, p90 {p90}, p99 {p99}, max {lengths.max()}")
        cut = sum(_supervised_count(trained, i) < _supervised_count(full, i)
                  for i in range(n) if trained.reasons[i] == 0)
        lines.append(f"data.max_length={max_length}: {(lengths > max_length).mean():.1%} of records truncated; "
                     f"truncation cuts answers in {cut}, leaves no answer in {check.answerless}")
    encoding = collections.Counter(REASONS[r] for r in trained.reasons if r)
    lines.append(f"skipped by the source: {_counts(records.skipped)}; by encoding (of those checked): "
                 f"{_counts(encoding)}")
    tokens, with_image = processor.num_image_tokens, sum(bool(records.key(int(i))) for i in check.sampled)
    lines.append(f"image tokens: {tokens} per image, {tokens * with_image / max(n, 1):.1f} per example on average "
                 f"({n - with_image} of {n} text only)")
    lines.append(_steps_line(records, stage, config))


def check_images(check: StageCheck, count: int, every: bool, seed: int) -> None:
    """Open `count` of the stage's images, chosen at random (all with `every`), and list those that fail."""
    with_image = [i for i in range(len(check.records)) if check.records.key(i)]
    # [:count]: subset_indices reads a count of 0 as "all".
    chosen = with_image if every else [with_image[i] for i in subset_indices(len(with_image), count, seed)][:count]
    failures = []
    for index in chosen:
        try:
            check.records[index].load()
        except ImageError as e:
            failures.append(f"record {index}: {e}")
    line = f"images: {len(chosen):,} of {len(with_image):,} opened, {len(failures)} did not"
    check.lines.append(line + "".join(f"\n  {f}" for f in failures[:5]) + ("\n  ..." if len(failures) > 5 else ""))


def render(input_ids: list[int], labels: list[int], processor: VLMProcessor, color: bool) -> str:
    """Token ids as text: a run of image tokens as `<image xN>`, supervised tokens green or in [[ ]]."""
    pieces = []
    runs = itertools.groupby(zip(input_ids, labels, strict=True),
                             key=lambda t: (t[0] == processor.image_token_id, t[1] != IGNORE_INDEX))
    for (is_image, supervised), run in runs:
        ids = [token for token, _ in run]
        text = f"<image x{len(ids)}>" if is_image else processor.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if supervised else text)
    return "".join(pieces)


def _steps_line(records: Records, stage: StageConfig, config: Config) -> str:
    train, held = split_holdout(records, config.data.val_fraction, config.train.seed)
    batches = len(LengthGroupedBatchSampler(train, stage.batch_size, config.train.seed))
    steps = optimizer_steps(stage, batches)
    how = f"max_steps {stage.max_steps}" if stage.max_steps else f"{stage.epochs:g} epoch(s)"
    return (f"optimizer steps: {len(train):,} records to train on ({len(held):,} held out), batch {stage.batch_size} "
            f"x grad_accum {stage.grad_accum}, {how}: {steps:,} steps on one process")


def _supervised_count(examples: TokenizedExamples, i: int) -> int:
    return int((examples.labels[examples.offsets[i]: examples.offsets[i + 1]] != IGNORE_INDEX).sum())


def _answers_ending(examples: TokenizedExamples, stops: set[int]) -> tuple[int, int]:
    """(supervised spans, spans holding an end-of-turn token) over the examples: each span is one answer."""
    answers = ended = 0
    for i in range(len(examples)):
        labels = examples.labels[examples.offsets[i]: examples.offsets[i + 1]]
        for supervised, run in itertools.groupby(labels, key=lambda t: t != IGNORE_INDEX):
            if supervised:
                answers += 1
                ended += any(int(t) in stops for t in run)
    return answers, ended


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in counter.most_common()) or "none"
