"""`vlm eval`'s loop on real JPEG files against the same questions with their images already decoded,
and against generation alone: does opening images in DataLoader workers keep generation fed?

    python -m benchmarks.scale_setup --out runs/scale --images 100000 --tokenizer DIR
    python -m benchmarks.eval_end_to_end --preset runs/scale/llava-scale.yaml --data runs/scale/data/vqav2
    python -m benchmarks.eval_end_to_end --preset easy-vqa-gpu --random-weights --benchmark easy_vqa --decoding compiled

Three timings over the same fixed-seed subset of a VQAv2-format folder, greedy, the same batches:
  files        vlm.evaluate.generate as `vlm eval` runs it: workers open, prompt and encode each batch
  decoded      the same, with every image decoded into memory beforehand (no JPEG decoding in the loop)
  generation   model.answer on batches encoded beforehand: the ceiling, nothing but the model
Each after a warm-up pass over other questions of the benchmark, so the rates are steady-state ones: with
--decoding compiled the warm-up compiles and records the decoding graphs, whose time is printed apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import describe_device, print_table, synchronize, write_efficientnet, write_lm


class Decoded(list):
    """A selection whose records were read, images decoded, before the clock starts."""

    def __init__(self, selection, threads: int = 16):
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
            super().__init__(pool.map(selection.__getitem__, range(len(selection))))
        self.benchmark = selection.benchmark


# Packaged or Hub LMs whose architecture benchmarks.common builds with random weights.
RANDOM_LMS = {"packaged:smollm2-135m-instruct": "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
              "HuggingFaceTB/SmolLM2-360M-Instruct": "smollm2-360m"}


def with_random_backbones(config, root: Path):
    """`config` with its LM and EfficientNet tower replaced by random weights of the same architecture,
    everything else (projector, dtypes, image size) as the preset has it."""
    if config.lm.name not in RANDOM_LMS or config.vision.backend != "efficientnet":
        raise SystemExit(f"--random-weights builds an EfficientNet tower and the LMs {list(RANDOM_LMS)}; "
                         f"this preset has {config.vision.backend}:{config.vision.name} and {config.lm.name}")
    vision = replace(config.vision, pretrained=str(write_efficientnet(config.vision.name, root)))
    lm = replace(config.lm, name=str(write_lm(RANDOM_LMS[config.lm.name], root, tiny=False)))
    return replace(config, vision=vision, lm=lm)


def main(argv=None) -> None:
    from vlm.config import load_config
    from vlm.evaluate import _Prompts, generate
    from vlm.model import DECODING, INFERENCE_DTYPES, VisionLanguageModel, to_accelerator
    from vlm.vqa_benchmarks import get_benchmark, select

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, help="the model (random weights are fine: speed is measured)")
    parser.add_argument("--random-weights", action="store_true",
                        help=f"the preset's architecture with random backbones (LMs: {', '.join(RANDOM_LMS)}; "
                             "EfficientNet towers), so nothing is downloaded")
    parser.add_argument("--benchmark", default="vqav2", help="a `vlm eval --benchmark` name")
    parser.add_argument("--data", help="the benchmark folder, e.g. a VQAv2-format one (benchmarks/make_llava_data.py)")
    parser.add_argument("--questions", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--decoding", choices=DECODING, default="dynamic", help="as `vlm eval --decoding`")
    parser.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto", help="as `vlm eval --dtype`")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    config = load_config(args.preset).model
    with tempfile.TemporaryDirectory() as tmp:  # random backbones' files: read once, while building the model
        if args.random_weights:
            config = with_random_backbones(config, Path(tmp))
        model = VisionLanguageModel.from_config(config)
    to_accelerator(model, args.dtype)
    benchmark = get_benchmark(args.benchmark)
    selection = select(benchmark, data=args.data, limit=args.questions, seed=0)
    settings = {"cot": False, "ocr": False, "batch_size": args.batch, "max_new_tokens": args.max_new_tokens,
                "decoding": args.decoding}
    warmup = 4 * args.batch
    start = time.perf_counter()
    generate(model, select(benchmark, data=args.data, limit=warmup, seed=1), **settings)
    print(describe_device(device), flush=True)
    print(f"warm-up: {warmup} questions in {time.perf_counter() - start:.1f} s (decoding {args.decoding}, "
          f"LM in {str(model.lm.dtype).removeprefix('torch.')})", flush=True)

    def timed(run) -> tuple[float, int]:
        synchronize(device)
        start = time.perf_counter()
        answered = run()
        synchronize(device)
        return time.perf_counter() - start, answered

    rows = []
    seconds, n = timed(lambda: len(generate(model, selection, **settings)[0]))
    rows.append({"path": "files (vlm eval)", "questions": n, "s": seconds, "questions/s": n / seconds})
    print(rows[-1], flush=True)
    decoded = Decoded(selection)
    seconds, n = timed(lambda: len(generate(model, decoded, **settings)[0]))
    rows.append({"path": "decoded beforehand", "questions": n, "s": seconds, "questions/s": n / seconds})
    print(rows[-1], flush=True)
    prompts = _Prompts(decoded, model, cot=False, ocr=False, max_new_tokens=args.max_new_tokens)
    batches = [prompts.collate([prompts[i] for i in range(start, min(start + args.batch, len(decoded)))])[2]
               for start in range(0, len(decoded), args.batch)]
    batches = [{k: v.pin_memory() if device == "cuda" else v for k, v in b.items()} for b in batches]
    seconds, n = timed(lambda: sum(len(model.answer(b, max_new_tokens=args.max_new_tokens, decoding=args.decoding))
                                   for b in batches))
    rows.append({"path": "generation alone", "questions": n, "s": seconds, "questions/s": n / seconds})
    for row in rows:
        row["vs decoded"] = row["questions/s"] / rows[1]["questions/s"]
        row["vs generation alone"] = row["questions/s"] / rows[2]["questions/s"]
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
