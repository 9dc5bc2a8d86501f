"""The `vlm` command: train / data check / eval / demo / chat / export.

The top of the house: it imports, nothing imports it. Every user error (bad path, unknown preset,
wrong config value, unreadable image) ends as one line on stderr and exit status 2, never a traceback;
`vlm data check` exits 1 on what it finds wrong with the data.
"""

from __future__ import annotations

import argparse
import sys

from vlm.config import ConfigError, load_config
from vlm.data.check import CHECK_SAMPLE, data_check
from vlm.evaluate import compare, run_eval
from vlm.export import export_llava
from vlm.files import EXAMPLES_DIR, WriteError
from vlm.images import ImageError, load_image
from vlm.model import DECODING, INFERENCE_DTYPES, check_generation_settings, load_model, to_accelerator
from vlm.processor import PromptError
from vlm.train.trainer import STAGES, check_config, load_stage_records, run_training
from vlm.vqa_benchmarks import BENCHMARKS

USER_ERRORS = (ConfigError, ImageError, PromptError, FileNotFoundError, WriteError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a projector (stage 1 align, stage 2 instruct)")
    train.add_argument("--config", default="offline", help="preset name or YAML path (default: offline)")
    train.add_argument("--stage", choices=["align", "instruct", "both"], help="overrides train.stage")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.seed=1")

    chat = commands.add_parser("chat", help="answer one question about one image, streamed")
    chat.add_argument(
        "--image", default=str(EXAMPLES_DIR / "shape_0.png"), help="image file (default: a bundled example)"
    )
    chat.add_argument("--question", required=True)
    _add_model_args(chat)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=0.9)

    evaluate = commands.add_parser("eval", help="score a checkpoint on a VQA benchmark subset")
    evaluate.add_argument("--checkpoint", help="checkpoint folder written by `vlm train` (default: the offline run's)")
    evaluate.add_argument(
        "--benchmark", default="easy_vqa", help=f"one of: {', '.join(BENCHMARKS)} (default: easy_vqa, offline)"
    )
    evaluate.add_argument("--data", help="local copy instead of the Hub: a snapshot folder, an image folder with "
                          "metadata.jsonl, or a .parquet/.json/.jsonl/.csv file with the Hub's columns")
    evaluate.add_argument("--split", help="dataset split (default: the benchmark's usual one)")
    evaluate.add_argument("--limit", type=int, default=1000, help="questions in the fixed-seed subset (0 = all)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-new-tokens", type=int, help="default 16, or 256 with --cot")
    evaluate.add_argument(
        "--cot", action="store_true", help="ask for step-by-step reasoning and score its final answer"
    )
    evaluate.add_argument("--ocr", action="store_true", help="textvqa: put the dataset's OCR tokens in the prompt")
    evaluate.add_argument("--output", help="results folder (default: <checkpoint>/eval/<benchmark>)")
    evaluate.add_argument("--decoding", choices=DECODING, default="dynamic",
                          help="KV cache and steps (the same greedy answers): a growing cache, eager (default: batched "
                               "evaluation measured fastest so on an H100, docs/benchmarks.md); a static one; or "
                               "a static one with CUDA-graph steps, on a GPU (the demo's choice for one answer)")
    evaluate.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                          help="what the LM's weights compute in (default: bfloat16 on a GPU that has it, as the GPU "
                               "presets train under mixed precision; as loaded on a CPU)")
    evaluate.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two results JSON files side by side")

    demo = commands.add_parser("demo", help="chat with a checkpoint in a Gradio app")
    _add_model_args(demo)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--share", action="store_true")

    data = commands.add_parser("data", help="inspect a preset's training data").add_subparsers(
        dest="data_command", required=True)
    check = data.add_parser("check", help="each stage's data as training will see it, with what is wrong with it; "
                            "exit status 1 on a finding that would spoil training")
    check.add_argument("--config", default="offline", help="preset name or YAML path (default: offline)")
    check.add_argument("--stage", choices=["align", "instruct"], help="one stage (default: those train.stage runs)")
    check.add_argument("--examples", type=int, default=3, metavar="K",
                       help="examples to show per stage (default 3); K*10 images are opened")
    check.add_argument("--sample", type=int, default=CHECK_SAMPLE, metavar="N",
                       help=f"records per stage to encode and measure (default {CHECK_SAMPLE}; 0 = all)")
    check.add_argument("--all-images", action="store_true", help="open every image, not K*10 of them")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_length=1024")

    export = commands.add_parser("export", help="write a transformers LlavaForConditionalGeneration folder")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as e:
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        for line in str(e).splitlines():  # a data check stops training with one line per finding
            print(f"vlm {command}: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlm {args.command}: interrupted", file=sys.stderr)
        return 130


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="checkpoint folder written by `vlm train` (default: the offline run's, if trained)"
    )
    parser.add_argument("--config", help="preset name or YAML path, for a model without a checkpoint")


def _run(args) -> int:
    if args.command == "chat":
        return _chat(args)
    if args.command == "train":
        return run_training(args.config, args.overrides, stage=args.stage, resume=args.resume)
    if args.command == "eval":
        if args.compare:
            print(compare(*args.compare))
            return 0
        return run_eval(args.checkpoint, args.benchmark, data=args.data, split=args.split, limit=args.limit,
                        seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        cot=args.cot, ocr=args.ocr, output=args.output, decoding=args.decoding, dtype=args.dtype)
    if args.command == "data":
        return _data_check(args)
    if args.command == "demo":
        # Gradio loads only for the demo: it adds a second to every other command's start, and an
        # environment without it (a bare GPU image) still trains and evaluates.
        from vlm.demo.app import launch

        return launch(args.checkpoint, args.config, host=args.host, port=args.port, share=args.share)
    export_llava(args.checkpoint, args.out)
    return 0


def _data_check(args) -> int:
    config = load_config(args.config, list(args.overrides) + ([f"train.stage={args.stage}"] if args.stage else []))
    stages = STAGES[config.train.stage]
    check_config(config, stages)
    records = {name: load_stage_records(config, name) for name in stages}
    return data_check(config, records, examples=args.examples, sample=args.sample, all_images=args.all_images)


def _chat(args) -> int:
    check_generation_settings(args.max_new_tokens, args.temperature, args.top_p)
    image = load_image(args.image)
    model = load_model(args.checkpoint, args.config, announce=lambda m: print(m, file=sys.stderr))
    to_accelerator(model)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {}
    # One answer: compiling decoding (seconds on a GPU) would take longer than the answer it speeds up.
    for piece in model.stream_chat(image, [{"role": "user", "content": args.question}],
                                   max_new_tokens=args.max_new_tokens, decoding="dynamic", **sampling):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
