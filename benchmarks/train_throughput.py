"""Training-step throughput: vlm against transformers' LlavaForConditionalGeneration built from the same
configs, projector only (stage 1) and projector + LoRA (stage 2), bf16 autocast, same batch and sequence.
Two references in the same run: LLaVA eager ("llava") and LLaVA after `torch.compile(model)` ("llava
compiled"); every other row is stated against each of them that ran.

    python -m benchmarks.train_throughput                  # on a GPU: the full comparison
    python -m benchmarks.train_throughput --tiny --steps 2 # CPU smoke run on tiny configs (one pair)

Each sequence is VQA-like: a short prefix, the image tokens, a question, an 8-token supervised
answer and the end of turn; labels are -100 everywhere but the answer. The backbones' weights
are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    LMS,
    PEAK_FLOPS,
    VISION,
    add_lora,
    against_references,
    build_llava,
    build_vlm,
    describe_device,
    lm_config,
    peak_memory_gib,
    print_table,
    reference_columns,
    reset_memory,
    synchronize,
    timed,
    train_flops_per_sample,
    vision_config,
    write_lm,
    write_vision,
)
from vlm.testing import tiny_chat_tokenizer

START = time.perf_counter()
PREFIX, ANSWER, SUFFIX = 5, 8, 3
COLUMNS = ["backbones", "stage", "system", "samples/s", "tokens/s", "step ms", "peak GiB", "MFU %"]
# The references: a --systems name and the label of its rows. Every other row is stated against each.
REFERENCES = {"llava": "llava (transformers)", "llava compiled": "llava compiled (transformers)"}


def make_batch(batch: int, image_tokens: int, text_tokens: int, image_token_id: int, device: str, processor=None):
    """Token ids [prefix][image x N][question][answer][suffix] with labels on the answer only; with vlm's
    `processor`, the batch as vlm's collator hands it over (positions found on the CPU, no mask)."""
    question = text_tokens - PREFIX - ANSWER - SUFFIX
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, image_token_id, (batch, text_tokens), generator=g)  # below the placeholder id
    image = torch.full((batch, image_tokens), image_token_id)
    input_ids = torch.cat([text[:, :PREFIX], image, text[:, PREFIX:]], dim=1)
    labels = torch.full_like(input_ids, -100)
    answer = slice(PREFIX + image_tokens + question, PREFIX + image_tokens + question + ANSWER)
    labels[:, answer] = input_ids[:, answer]
    cpu = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if processor is not None:
        cpu.update(processor.training_positions(cpu))
        del cpu["attention_mask"]
    return {key: value.to(device) for key, value in cpu.items()}


def make_step(model, loss_fn, device: str):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(step, device: str, args, profile_to: Path | None = None) -> dict:
    reset_memory(device)  # before the warm-up: the peak covers the first step's optimizer state
    for _ in range(args.warmup):
        step()
    seconds = timed(step, device, args.steps)
    memory = peak_memory_gib(device)
    if profile_to is not None:
        profile(step, device, profile_to)
    return {"seconds": seconds, "peak GiB": memory}


def profile(step, device: str, path: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))


def run_pair(vision_name: str, lm_name: str, args, root: Path) -> list[dict]:
    device = args.device
    vision_dir, lm_dir = write_vision(vision_name, root, args.tiny), write_lm(lm_name, root, args.tiny)
    vcfg, lcfg = vision_config(vision_name, args.tiny), lm_config(lm_name, args.tiny, tiny_chat_tokenizer())
    image_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
    seq = image_tokens + args.text_tokens
    label = f"{vision_name} + {lm_name}"
    rows = []

    def record(system, stage, result, cached, lora_r):
        flops = train_flops_per_sample(vcfg, lcfg, seq, image_tokens, ANSWER, cached, lora_r)
        samples = args.batch / result["seconds"]
        row = {"backbones": label, "stage": stage, "system": system, "samples/s": samples, "tokens/s": samples * seq,
               "step ms": result["seconds"] * 1e3, "peak GiB": result["peak GiB"],
               "MFU %": 100 * flops * samples / PEAK_FLOPS}
        rows.append(row)
        print(json.dumps({**row, "elapsed s": round(time.perf_counter() - START)}), flush=True)

    pixels = torch.randn(args.batch, 3, vcfg.image_size, vcfg.image_size, device=device)
    profiles = args.profile_dir if (vision_name, lm_name) == args.pairs[0] else None
    for stage in args.stages:
        lora_r = 16 if stage == 2 else 0
        for system in [name for name in REFERENCES if name in args.systems]:
            reset_memory(device, forget_compiled=True)
            step = llava_step(system, vision_name, lm_name, lm_dir, stage, pixels, image_tokens, args)
            tag = system.replace(" ", "_")
            record(
                REFERENCES[system],
                stage,
                measure(step, device, args, _profile_path(profiles, f"{tag}_s{stage}")),
                False,
                lora_r,
            )
            del step
        for system in [name for name in ("vlm", "vlm compiled") if name in args.systems]:
            reset_memory(device, forget_compiled=True)
            model = build_vlm(vision_dir, lm_dir, device)
            if stage == 2:
                add_lora(model.lm)
            _print_attention(system, model.vision.tower.config, model.lm.config)
            if system == "vlm compiled":
                model.compile_for_training()
            batch = make_batch(args.batch, image_tokens, args.text_tokens, model.processor.image_token_id, device,
                               model.processor)
            tag = system.replace(" ", "_")
            step = make_step(model, lambda m=model, b=batch: m(**b, pixel_values=pixels)["loss"], device)
            record(
                system, stage, measure(step, device, args, _profile_path(profiles, f"{tag}_s{stage}")), False, lora_r
            )
            features = model.image_features(pixels)  # what the feature cache hands the model: bf16 [B, N, D]
            step = make_step(model, lambda m=model, b=batch, f=features: m(**b, image_features=f)["loss"], device)
            record(system + " + feature cache", stage,
                   measure(step, device, args, _profile_path(profiles, f"{tag}_cache_s{stage}")), True, lora_r)
            del model, step, features
    return rows


def llava_step(system: str, vision_name: str, lm_name: str, lm_dir: Path, stage: int, pixels: torch.Tensor,
               image_tokens: int, args):
    """One training step of the transformers LLaVA reference `system` ("llava" eager, "llava compiled") on the
    benchmark's batch."""
    device = args.device
    llava = build_llava(vision_name, lm_name, args.tiny, image_token_id=_image_token_id(lm_dir), device=device)
    if stage == 2:
        add_lora(llava.model.language_model)
    _print_attention(system, llava.config.vision_config, llava.config.text_config)
    # transformers' own way to speed up a model: torch.compile on the whole of it, default mode. The
    # optimizer and autocast are the eager reference's; compiling happens in the warm-up.
    forward = torch.compile(llava) if system == "llava compiled" else llava
    batch = make_batch(args.batch, image_tokens, args.text_tokens, _image_token_id(lm_dir), device)
    return make_step(llava, lambda m=forward, b=batch: m(**b, pixel_values=pixels.to(torch.bfloat16)).loss, device)


def stage1_against_compiled_llava(variants: dict, changed: str, argv: list[str]) -> list[dict]:
    """Rows for the stage-1 diagnostics (benchmarks/stage1_*.py) on ViT-L/336 + SmolLM2-135M: compiled LLaVA, then
    vlm compiled after each variant's change to the model (a callable returning how many parts it changed, shown in
    column `changed`; None for vlm as it is), with and without the feature cache. Each variant starts from the same
    seed, so its loss on the same batch shows whether the change computes the same thing."""
    pair = ("vit-l14-336", "smollm2-135m")
    args = build_parser().parse_args(["--stages", "1", *argv])
    device = args.device
    print(describe_device(device), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vision_dir, lm_dir = write_vision(pair[0], Path(tmp), args.tiny), write_lm(pair[1], Path(tmp), args.tiny)
        vcfg = vision_config(pair[0], args.tiny)
        image_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
        pixels = torch.randn(args.batch, 3, vcfg.image_size, vcfg.image_size, device=device)

        reset_memory(device, forget_compiled=True)
        step = llava_step("llava compiled", *pair, lm_dir, 1, pixels, image_tokens, args)
        reference = measure(step, device, args)["seconds"]
        rows.append({"system": "llava compiled", changed: 0, "step ms": reference * 1e3, "vs llava compiled": 1.0})
        del step

        for variant, change in variants.items():
            reset_memory(device, forget_compiled=True)
            torch.manual_seed(0)
            model = build_vlm(vision_dir, lm_dir, device)
            count = change(model) if change else 0
            model.compile_for_training()
            batch = make_batch(args.batch, image_tokens, args.text_tokens, model.processor.image_token_id, device,
                               model.processor)
            with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                loss = float(model(**batch, pixel_values=pixels)["loss"])
            features = model.image_features(pixels)
            inputs = {"": {"pixel_values": pixels}, " + feature cache": {"image_features": features}}
            for suffix, images in inputs.items():
                step = make_step(model, lambda m=model, b=batch, i=images: m(**b, **i)["loss"], device)
                seconds = measure(step, device, args)["seconds"]
                rows.append({"system": f"vlm compiled, {variant}{suffix}", changed: count, "step ms": seconds * 1e3,
                             "vs llava compiled": reference / seconds, "loss": f"{loss:.5f}"})
                print(rows[-1], flush=True)
            del model, step, features
    print()
    print_table(rows, ["system", changed, "step ms", "vs llava compiled", "loss"])
    return rows


def _print_attention(system: str, vision, text) -> None:
    print(f"{system}: attention {vision._attn_implementation} (vision), {text._attn_implementation} (LM)", flush=True)


def _image_token_id(lm_dir: Path) -> int:
    from transformers import AutoTokenizer

    from vlm.language_model import IMAGE_TOKEN, prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    prepare_tokenizer(tokenizer)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _profile_path(directory: Path | None, name: str) -> Path | None:
    return None if directory is None else directory / f"profile_{name}.txt"


RATIOS = {"samples/s": "samples/s", "peak GiB": "peak memory"}


def ratios(rows: list[dict]) -> list[dict]:
    """Each row over each reference row of the same backbones and stage in the run: samples/s and peak
    memory. "llava compiled" is stated against "llava", the eager reference is not stated."""
    return against_references(rows, REFERENCES, ["backbones", "stage"], RATIOS)


def ratio_columns(systems: list[str]) -> list[str]:
    return ["backbones", "stage", "system", *reference_columns(REFERENCES, systems, RATIOS)]


def parse_pair(text: str) -> tuple[str, str]:
    vision, _, lm = text.partition(":")
    if vision not in VISION or lm not in LMS:
        raise argparse.ArgumentTypeError(f"{text!r}: use VISION:LM with VISION in {list(VISION)} and LM in {list(LMS)}")
    return vision, lm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=parse_pair, nargs="+", metavar="VISION:LM",
                        help="default: every pair; with --tiny the first only (tiny configs replace them all alike)")
    parser.add_argument("--stages", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    # "vlm compiled": after VisionLanguageModel.compile_for_training(); "llava compiled": torch.compile(llava).
    # Each compiles in its warm-up (seconds to a minute per model).
    systems = [*REFERENCES, "vlm", "vlm compiled"]
    parser.add_argument("--systems", nargs="+", choices=systems, default=systems)
    parser.add_argument("--batch", type=int, default=32, help="vlm's default training batch (train.*.batch_size)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens around the image tokens")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs, to check the script runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile-dir", type=Path, help="write torch.profiler tables of the first pair's steps here")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.pairs = args.pairs or [parse_pair(f"{v}:{l}") for v in VISION for l in LMS][:1 if args.tiny else None]
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    print(describe_device(args.device), flush=True)
    print(f"batch {args.batch}, text tokens {args.text_tokens} ({ANSWER} supervised), bf16 autocast, "
          f"frozen backbones in bf16, projector/LoRA in fp32, AdamW; {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for vision, lm in args.pairs for row in run_pair(vision, lm, args, Path(tmp))]
    print()
    print_table(rows, COLUMNS)
    print()
    print_table(ratios(rows), ratio_columns(args.systems))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
