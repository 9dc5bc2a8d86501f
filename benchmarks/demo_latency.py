"""Time to first token and tokens/s of the demo's answers, for the model `vlm demo` would load.

    python -m benchmarks.demo_latency                      # offline default on CPU
    python -m benchmarks.demo_latency --device cuda --users 1 4

Each answer is forced to --max-new-tokens tokens (greedy), so tokens/s does not depend on where
the model chooses to stop. Time to first token runs from the request (image preprocessing and
prompt encoding included) to the first generated token; tokens/s per user is the decode rate after it.
--users N starts N answers at once on the one shared model, as the demo's queue does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from benchmarks.common import describe_device, print_table, timed_answer
from vlm.demo.app import EXAMPLES
from vlm.files import EXAMPLES_DIR
from vlm.images import load_image
from vlm.model import load_model


def together(model, requests, max_new_tokens: int) -> tuple[list[dict], float]:
    """Answers for all requests started at once; also their combined tokens/s."""
    results: list[dict] = [{}] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i, image, conversation):
        barrier.wait()
        results[i] = timed_answer(model, image, conversation, max_new_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, sum(r["tokens"] for r in results) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="as for `vlm demo` (default: the trained offline run's, if any)")
    parser.add_argument("--config", help="as for `vlm demo`")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2], help="answers generated at once")
    parser.add_argument("--runs", type=int, default=2, help="rounds over the demo's example questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    announced: list[str] = []
    start = time.perf_counter()
    model = load_model(args.checkpoint, args.config, announce=announced.append).to(args.device).eval()
    load_s = time.perf_counter() - start
    requests = [
        (load_image(EXAMPLES_DIR / name), [{"role": "user", "content": question}]) for name, question in EXAMPLES
    ]
    timed_answer(model, *requests[0], new_tokens=4)  # first call pays one-off allocation and kernel selection

    print(describe_device(args.device))
    print(f"{model.config.vision.backend}:{model.config.vision.name} + {model.config.lm.name}; "
          f"{announced[-1].removeprefix('loading ')}")
    print(
        f"{torch.get_num_threads()} CPU threads; loaded in {load_s:.1f} s; "
        f"{args.max_new_tokens} new tokens per answer, "
        f"{args.runs} rounds of {len(requests)} example questions\n"
    )
    rows = []
    for users in args.users:
        answers, totals = [], []
        for _ in range(args.runs):
            for i in range(0, len(requests), users):
                group = [requests[(i + j) % len(requests)] for j in range(users)]
                results, total = together(model, group, args.max_new_tokens)
                answers += results
                totals.append(total)
        ttft = [a["ttft"] for a in answers]
        rows.append({"users at once": users, "answers": len(answers),
                     "time to first token s (median)": statistics.median(ttft), "(max)": max(ttft),
                     "tokens/s per user (median)": statistics.median(a["rate"] for a in answers),
                     "tokens/s all users": statistics.median(totals)})
    print_table(rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
