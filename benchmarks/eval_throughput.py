"""Evaluation throughput: vlm's batched greedy generation (`model.chat` on a batch, left padding)
against a per-sample loop (`model.chat` on one question at a time: batch 1), in questions/s.

    python -m benchmarks.eval_throughput                  # on a GPU
    python -m benchmarks.eval_throughput --tiny --batches 1 4 --questions 8   # CPU smoke run

Every question gets its own image (preprocessing is part of the measured time) and exactly
--new-tokens answer tokens (min_new_tokens = max_new_tokens, so random weights cannot end an
answer early and favour either side). Last, the demo's path for one question: time to the
first token and decoding tokens/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import (
    LMS,
    VISION,
    build_vlm,
    describe_device,
    print_table,
    synchronize,
    timed_answer,
    write_lm,
    write_vision,
)

QUESTIONS = ["What color is the shape?", "What shape is in the image?", "How many objects are there?",
             "Is there a circle in the picture?"]


def make_questions(n: int) -> tuple[list[Image.Image], list[list[dict]]]:
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)
    ]
    conversations = [[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} Answer with a single word."}]
                     for i in range(n)]
    return images, conversations


def questions_per_second(model, images, conversations, batch: int, new_tokens: int, device: str) -> float:
    import time

    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    model.chat(images[:batch], conversations[:batch], **generate)  # warm-up at this shape
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        model.chat(images[i:i + batch], conversations[i:i + batch], **generate)
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def stream_latency(model, image, conversation, new_tokens: int, repeats: int) -> dict:
    """Medians of `timed_answer` over `repeats` runs after one warm-up."""
    import statistics

    first, rates = [], []
    for _ in range(repeats + 1):  # the first run warms up
        answer = timed_answer(model, image, conversation, new_tokens)
        first.append(answer["ttft"])
        rates.append(answer["rate"])
    return {"time to first token ms": 1e3 * statistics.median(first[1:]), "tokens/s": statistics.median(rates[1:])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vision", choices=list(VISION), default="vit-l14-336")
    parser.add_argument("--lm", choices=list(LMS), default="smollm2-135m")
    # Batch 1 is the per-sample loop the other rows are compared with.
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--questions", type=int, default=32, help="questions per measurement (at least the batch)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=64, help="answer length for the streaming latency")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs, to check the script runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    print(describe_device(args.device), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_vlm(write_vision(args.vision, root, args.tiny), write_lm(args.lm, root, args.tiny), args.device)
    model.eval()
    print(
        f"{args.vision} + {args.lm}{' (tiny configs)' if args.tiny else ''}, bf16 backbones, greedy, "
        f"{args.new_tokens} new tokens per answer",
        flush=True,
    )

    images, conversations = make_questions(max(args.questions, *args.batches))
    rows = []
    for batch in args.batches:
        n = max(batch, args.questions)
        rate = questions_per_second(model, images[:n], conversations[:n], batch, args.new_tokens, args.device)
        rows.append(
            {
                "batch": batch,
                "questions": n,
                "questions/s": rate,
                "vs per-sample loop": rate / rows[0]["questions/s"] if rows else 1.0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    latency = stream_latency(model, images[0], conversations[0], args.stream_tokens, repeats=5)
    print(json.dumps(latency), flush=True)
    print()
    print_table(rows, ["batch", "questions", "questions/s", "vs per-sample loop"])
    print()
    print_table([latency], list(latency))
    if args.json:
        args.json.write_text(json.dumps({"batched": rows, "stream": latency}, indent=1))


if __name__ == "__main__":
    main()
