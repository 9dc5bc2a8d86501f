"""Two-stage training on accelerate: one GPU, several GPUs, a CPU, or `accelerate launch`, same code.

Stage `align` trains the projector on image-caption pairs; stage `instruct` trains it (and
optionally LoRA or the whole LM) on question/answer conversations. The vision encoder never trains.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, send_to_device, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vlm.config import AugmentConfig, Config, ConfigError, StageConfig, load_config, to_dict
from vlm.data.batches import (
    Collator,
    ConversationDataset,
    LengthGroupedBatchSampler,
    PackedBatchSampler,
    SkipCounter,
    TokenizedExamples,
    cache_items,
    default_workers,
    optimizer_steps,
    split_holdout,
    stage_augment,
)
from vlm.data.check import stop_on_fatal_findings
from vlm.data.feature_cache import FeatureCache, ensure_fits, feature_spec
from vlm.data.sources import Records, check_source, load_examples
from vlm.model import PAD_MULTIPLE_COMPILED, VisionLanguageModel, decoder_blocks
from vlm.precision import bf16_is_fast, slow_bf16_warning
from vlm.train.checkpoint import (
    Progress,
    check_run_folder,
    list_checkpoints,
    read_progress,
    restore_rng,
    restore_training_state,
    run_folder_writes,
    save_checkpoint,
)
from vlm.train.report import plot_losses, write_report

STAGE_ORDER = ["align", "instruct"]
STAGES = {"align": ["align"], "instruct": ["instruct"], "both": STAGE_ORDER}


def run_training(preset: str, overrides: list[str], stage: str | None = None, resume: bool = False) -> int:
    config = load_config(preset, list(overrides) + ([f"train.stage={stage}"] if stage else []))
    output_dir = Path(config.train.output_dir)
    stages, resume_from, start_from = plan_stages(STAGES[config.train.stage], list_checkpoints(output_dir), resume,
                                                  output_dir)
    check_config(config, stages)
    warn_if_bf16_is_slow(config)
    # Every record is read, and a stage with nothing to train on stops, before any model loads.
    records = {name: load_stage_records(config, name) for name in stages}
    check_run_folder(output_dir)
    stop_on_fatal_findings(config, records)  # a sample of each stage, encoded as training will encode it

    accelerator = Accelerator(
        mixed_precision=_precision(config.train.mixed_precision),
        # TensorBoard is a dependency; an environment without it (a bare GPU image) still trains.
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=str(output_dir),
    )
    set_seed(config.train.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    accelerator.init_trackers("tensorboard")
    model = VisionLanguageModel.from_config(config.model).to(accelerator.device)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda":
        # Frozen, so bf16 weights halve its memory traffic on the GPU and the cache stores bf16. On a CPU
        # without bf16 matrix units a bf16 tower is slower than fp32, so it stays fp32 there.
        model.vision.to(torch.bfloat16)
    cache = open_feature_cache(config, model, records, accelerator)
    run = Run(config, accelerator, model, cache, MetricsLog(output_dir / "metrics.jsonl", accelerator))

    if start_from is not None:
        # The RNG too, so the next stage starts exactly as it would have in one uninterrupted run (LoRA's init draws).
        model.load_trained_weights(start_from / "model")
        restore_rng(start_from)
    summaries = {}
    for name in stages:
        summaries[name] = train_stage(run, name, records[name], resume_from)
        resume_from = None

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with run_folder_writes(output_dir):
            accelerator.unwrap_model(model).save_pretrained(output_dir / "final")
        plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
        report = write_report(output_dir, summaries, config.train, accelerator)
        print(f"trained projector saved to {output_dir / 'final'}\n{report}")
    accelerator.end_training()
    return 0


def plan_stages(requested: list[str], checkpoints: list[Path], resume: bool, output_dir: Path
                ) -> tuple[list[str], Path | None, Path | None]:
    """The stages this command trains, the checkpoint the first resumes, and the finished stage's
    checkpoint whose weights the first starts from.

    --resume continues the stage the last checkpoint was written in, whatever --stage says, then the
    requested stages after it: under `--stage instruct --resume` a run killed in align finishes align
    first, and `--stage align --resume` never sends a run killed in instruct back to align. A finished
    stage hands its weights to the next, with or without --resume (`--stage instruct` after `--stage align`).
    """
    if not checkpoints:
        return requested, None, None  # --resume too: a run killed before its first checkpoint starts over
    last = read_progress(checkpoints[-1])
    later = [name for name in requested if STAGE_ORDER.index(name) > STAGE_ORDER.index(last.stage)]
    if last.done and later and (resume or later == requested):
        return later, None, checkpoints[-1]
    if resume:
        return [last.stage, *later], checkpoints[-1], None
    raise ConfigError(
        f"{output_dir} already holds a run's checkpoints; pass --resume to continue it, "
        "or set train.output_dir=<new folder> to start another"
    )


def load_stage_records(config: Config, name: str) -> Records:
    records = load_examples(getattr(config.data, name), name, config.model.lm.short_answer_prompt)
    if not len(records):
        counts = ", ".join(f"{n} {reason}" for reason, n in records.skipped.most_common()) or "the source is empty"
        raise ConfigError(f"data.{name} has no record to train on ({counts}); check data.{name}.path")
    return records


def open_feature_cache(config: Config, model: VisionLanguageModel, records: dict[str, Records],
                       accelerator: Accelerator) -> FeatureCache | None:
    """The feature cache, or None where data.cache says so or (auto) where it would not pay or fit."""
    announce = print if accelerator.is_main_process else (lambda *_: None)
    augment = config.data.augment
    if augment.views:
        announce(f"data.augment: {augment.views} views of each training image, epoch e reading view e mod "
                 f"{augment.views}; held-out images as they are")
    if config.data.cache == "off":
        return None
    keys = {name: set(cache_items(r, *stage_images(config, name, r, accelerator.num_processes)))
            for name, r in records.items()}
    if config.data.cache == "auto":
        # A cached image pays when a later epoch reads it again: under data.augment, not before epoch `views`.
        several_epochs = [n for n in records if getattr(config.train, n).epochs > max(1, augment.views)]
        shared = len(keys) == 2 and not keys["align"].isdisjoint(keys["instruct"])
        if not several_epochs and not shared:
            announce("feature cache off: every image is read once (one epoch, no image in both stages); "
                     "data.cache=on keeps features for later runs")
            return None
    cache = FeatureCache(feature_spec(model), config.data.cache_dir)
    wanted = sorted(set().union(*keys.values()))
    if config.data.cache == "auto":
        _, line, problem = cache.size_report(wanted, config.data.cache_max_gb)
        if problem:
            announce(f"feature cache off: {problem}; images are encoded at every step ({line})")
            return None
    ensure_fits(cache, wanted, config.data.cache_max_gb, announce)
    return cache


def stage_images(config: Config, name: str, records: Records, processes: int
                 ) -> tuple[np.ndarray, np.ndarray, AugmentConfig | None]:
    """The stage's training and held-out record indices, and the augmentation its training images get."""
    stage: StageConfig = getattr(config.train, name)
    train_indices, val_indices = split_holdout(records, config.data.val_fraction, config.train.seed)
    batches = len(LengthGroupedBatchSampler(train_indices, stage.batch_size, config.train.seed, 0, processes))
    return train_indices, val_indices, stage_augment(config.data.augment, stage, batches)


def check_config(config: Config, stages: list[str]) -> None:
    """Everything that can be wrong with a config for these stages, checked before any model loads."""
    for name in stages:
        stage: StageConfig = getattr(config.train, name)
        if name == "align" and stage.train_lm != "none":
            raise ConfigError("train.align.train_lm must be none: stage 1 trains the projector only")
        if not stage.train_projector and stage.train_lm == "none":
            raise ConfigError(f"train.{name} would train nothing: with train_projector false, set train_lm "
                              "to lora or full")
        if stage.lora_layers < 0 or (stage.lora_layers and stage.train_lm != "lora"):
            raise ConfigError(f"train.{name}.lora_layers={stage.lora_layers}: it counts the top decoder blocks "
                              "that get LoRA (train_lm: lora); 0 means all of them")
        for key in ("batch_size", "grad_accum"):
            if getattr(stage, key) < 1:
                raise ConfigError(f"train.{name}.{key} must be at least 1")
        if stage.epochs <= 0 and stage.max_steps <= 0:
            raise ConfigError(f"train.{name}: set epochs > 0 or max_steps > 0")
        if stage.pack_length and stage.pack_length < config.data.max_length:
            raise ConfigError(f"train.{name}.pack_length={stage.pack_length} is shorter than data.max_length="
                              f"{config.data.max_length}, the longest example; set it to 0 (= max_length) or more")
        check_source(getattr(config.data, name), name)
    if not 0 <= config.data.val_fraction < 1:
        raise ConfigError("data.val_fraction must be in [0, 1)")


@dataclass
class Run:
    """What every stage of one training run shares."""

    config: Config
    accelerator: Accelerator
    model: VisionLanguageModel
    cache: FeatureCache | None
    metrics: MetricsLog


@dataclass
class StageData:
    loader: DataLoader
    sampler: LengthGroupedBatchSampler
    val_loader: DataLoader
    skipped: SkipCounter  # records dropped from batches, counted here in the main process
    num_examples: int
    unreadable: collections.Counter  # records the source could not turn into examples


def train_stage(run: Run, name: str, records: Records, resume_from: Path | None) -> dict:
    config, accelerator, metrics = run.config, run.accelerator, run.metrics
    stage: StageConfig = getattr(config.train, name)
    trainable = configure_trainable(run.model, stage)
    compiled = config.train.compile if config.train.compile is not None else accelerator.device.type == "cuda"
    if compiled:
        run.model.compile_for_training()
    data = build_data(run, name, records, stage, PAD_MULTIPLE_COMPILED if compiled else None)
    optimizer, scheduler, total_steps = build_optimizer(trainable, stage, len(data.sampler))
    # The training loader stays ours (see LengthGroupedBatchSampler); accelerate wraps the rest.
    model, optimizer, val_loader, scheduler = accelerator.prepare(run.model, optimizer, data.val_loader, scheduler)

    progress = Progress(stage=name)
    if resume_from is not None:
        progress = read_progress(resume_from)
        accelerator.unwrap_model(model).load_trained_weights(resume_from / "model")
        restore_training_state(resume_from, optimizer, scheduler)
    if progress.done:
        return _summary(progress, data)

    if progress.step == 0:  # the untrained baseline, so the curve shows what training bought
        metrics.log(name, 0, {"val_loss": evaluate_loss(model, val_loader, accelerator)})
    # Closed on the way out of an error too, so the error's one line starts a line of its own.
    with tqdm(
        total=total_steps, initial=progress.step, desc=f"stage {name}", disable=not accelerator.is_local_main_process
    ) as bar:
        model.train()
        started, window_samples, window_tokens, window_start = time.time() - progress.seconds, 0, 0, time.time()
        micro = 0
        while progress.step < total_steps:
            data.sampler.set_position(progress.epoch, progress.batches_in_epoch)
            for batch in data.loader:
                progress.batches_in_epoch += 1
                data.skipped.add(batch.pop("skipped"))
                if not batch:
                    continue
                examples = batch.pop("examples")
                # Pinned batches copy while the GPU still runs the last step; nothing in the step waits on the GPU.
                batch = send_to_device(batch, accelerator.device, non_blocking=True)
                # Accumulation by hand: checkpoints fall on optimizer steps, so a resumed run restarts
                # the count at zero exactly where the interrupted one did.
                micro += 1
                sync = micro % stage.grad_accum == 0
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = model(**batch)["loss"]
                    accelerator.backward(loss / stage.grad_accum)
                samples = examples * accelerator.num_processes
                progress.samples += samples
                window_samples += samples
                window_tokens += batch["input_ids"].numel() * accelerator.num_processes
                if not sync:
                    continue
                accelerator.clip_grad_norm_(trainable, config.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                progress.step += 1
                progress.seconds = time.time() - started
                bar.update(1)
                if progress.step % config.train.log_every == 0 or progress.step == total_steps:
                    rate = window_samples / max(time.time() - window_start, 1e-9)
                    row = {"loss": accelerator.gather(loss.detach()).mean().item(), "lr": scheduler.get_last_lr()[0],
                           "samples_per_s": rate, "tokens_per_sample": window_tokens / max(window_samples, 1)}
                    metrics.log(name, progress.step, row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", samples_s=f"{rate:.1f}")
                    window_samples, window_tokens, window_start = 0, 0, time.time()
                if progress.step % config.train.eval_every == 0:
                    metrics.log(name, progress.step, {"val_loss": evaluate_loss(model, val_loader, accelerator)})
                if progress.step % config.train.save_every == 0 and progress.step < total_steps:
                    _save(accelerator, model, optimizer, scheduler, progress, config)
                if progress.step >= total_steps:
                    break
            else:
                progress.epoch += 1
                progress.batches_in_epoch = 0
    metrics.log(name, progress.step, {"val_loss": evaluate_loss(model, val_loader, accelerator)})
    progress.done = True
    _save(accelerator, model, optimizer, scheduler, progress, config)
    return _summary(progress, data)


def build_data(run: Run, name: str, records: Records, stage: StageConfig, pad_to_multiple_of: int | None
               ) -> StageData:
    """The stage's examples, split into training and held-out images, encoded, their features cached, and loaders."""
    config, accelerator, model = run.config, run.accelerator, run.model
    train_indices, val_indices, augment = stage_images(config, name, records, accelerator.num_processes)
    workers = config.data.num_workers
    if workers is None:
        workers = default_workers(accelerator.device, accelerator.num_processes)
    if run.cache is not None:
        # Each process encodes its share; then every process sees every shard.
        run.cache.build(list(cache_items(records, train_indices, val_indices, augment).items()), model.image_features,
                        model.vision.preprocess, device=accelerator.device, num_workers=workers,
                        rank=accelerator.process_index, world_size=accelerator.num_processes,
                        show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        run.cache.refresh()
    train = ConversationDataset(TokenizedExamples(records, train_indices, model.processor, config.data.max_length),
                                run.cache, augment)
    # Validation loss is measured on the held-out images as they are.
    val = ConversationDataset(TokenizedExamples(records, val_indices, model.processor, config.data.max_length),
                              run.cache)
    views = augment.views if augment else 0
    if stage.packing == "on":
        # Validation stays padded: its loss is the same either way, and it is a small share of the work.
        length = stage.pack_length or config.data.max_length
        collator = Collator(model.processor, run.cache, pack=(stage.batch_size, length))
        sampler = PackedBatchSampler(train, stage.batch_size, length, config.train.seed,
                                     accelerator.process_index, accelerator.num_processes, views=views)
    else:
        collator = Collator(model.processor, run.cache, pad_to_multiple_of)
        sampler = LengthGroupedBatchSampler(train, stage.batch_size, config.train.seed,
                                            accelerator.process_index, accelerator.num_processes, views=views)
    val_collator = Collator(model.processor, run.cache, pad_to_multiple_of)
    pin = accelerator.device.type == "cuda"
    # Persistent workers: forking them again every epoch would cost seconds of idle GPU each time.
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=collator, num_workers=workers, pin_memory=pin,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    val_loader = DataLoader(val, batch_size=stage.batch_size, collate_fn=val_collator, num_workers=min(workers, 2),
                            pin_memory=pin)
    return StageData(loader, sampler, val_loader, SkipCounter(), len(records), records.skipped)


def build_optimizer(trainable: list[torch.nn.Parameter], stage: StageConfig, batches_per_epoch: int):
    """AdamW with linear warmup then cosine decay; also returns the stage's number of optimizer steps."""
    # Fused: one kernel over all of LoRA's 420 small tensors, where a CPU otherwise loops over ops per tensor. On a
    # 2-core Zen 3 the offline preset's optimizer step took 22-25 ms against 66-76 ms, its whole stage-2 step
    # 2-4.5% less (`python -m benchmarks.cpu_optimizer`, two runs; docs/benchmarks.md).
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    total_steps = optimizer_steps(stage, batches_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(stage.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler, total_steps


def configure_trainable(model: VisionLanguageModel, stage: StageConfig) -> list[torch.nn.Parameter]:
    if stage.train_lm == "lora" and not hasattr(model.lm, "peft_config"):
        from peft import LoraConfig, get_peft_model

        model.lm = get_peft_model(model.lm, LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha,
                                                       target_modules=lora_targets(model.lm, stage.lora_layers),
                                                       task_type="CAUSAL_LM"))
    elif stage.train_lm == "full":
        model.lm.requires_grad_(True)
    model.projector.requires_grad_(stage.train_projector)
    return [p for p in model.parameters() if p.requires_grad]


def lora_targets(lm: torch.nn.Module, top_blocks: int) -> str | list[str]:
    """peft's target_modules: every linear layer of the decoder ("all-linear"), or those of its top blocks."""
    if not top_blocks:
        return "all-linear"
    blocks = decoder_blocks(lm)
    if top_blocks > len(blocks):
        raise ConfigError(f"lora_layers={top_blocks}, but the LM has {len(blocks)} decoder blocks; "
                          f"set it to at most {len(blocks)}, or 0 for all")
    top = {id(block) for block in blocks[-top_blocks:]}
    names = []
    for name, module in lm.named_modules():
        if id(module) in top:
            names += [f"{name}.{sub}" for sub, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)]
    return names


@torch.no_grad()
def evaluate_loss(model, loader, accelerator: Accelerator) -> float:
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        batch.pop("skipped")
        if batch:
            batch.pop("examples")
            out = model(**batch)
            total += out["loss"] * out["num_tokens"]
            count += out["num_tokens"]
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


def _save(accelerator, model, optimizer, scheduler, progress: Progress, config: Config) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(Path(config.train.output_dir), accelerator.unwrap_model(model), optimizer, scheduler,
                        progress, config.train.keep_last)
    accelerator.wait_for_everyone()


def _summary(progress: Progress, data: StageData) -> dict:
    return {"steps": progress.step, "samples": progress.samples, "seconds": progress.seconds,
            "examples": data.num_examples, "skipped": {**data.unreadable, **data.skipped.counts()}}


def _precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if bf16_is_fast() else "no"
    return setting


def warn_if_bf16_is_slow(config: Config) -> None:
    asked = {"train.mixed_precision": config.train.mixed_precision, "model.lm.dtype": config.model.lm.dtype}
    for key, value in asked.items():
        if value in ("bf16", "bfloat16") and (warning := slow_bf16_warning(f"{key}={value}")):
            print(f"vlm train: warning: {warning}", file=sys.stderr)


class MetricsLog:
    """metrics.jsonl for scripts and plots, TensorBoard through accelerate's tracker."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path, self.accelerator = path, accelerator

    def log(self, stage: str, step: int, values: dict) -> None:
        self.accelerator.log({f"{stage}/{k}": v for k, v in values.items()}, step=step)
        if self.accelerator.is_main_process:
            with run_folder_writes(self.path.parent), self.path.open("a") as f:
                f.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **values}) + "\n")
