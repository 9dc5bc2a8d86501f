"""`vlm eval`'s loop on real JPEG files against the same questions with their images already decoded,
and against generation alone: does opening images in DataLoader workers keep generation fed?

    python -m benchmarks.scale_setup --out runs/scale --images 100000 --tokenizer DIR
    python -m benchmarks.eval_end_to_end --preset runs/scale/llava-scale.yaml --data runs/scale/data/vqav2

Three timings over the same fixed-seed subset of a VQAv2-format folder, greedy, the same batches:
  files        vlm.evaluate.generate as `vlm eval` runs it: workers open, prompt and encode each batch
  decoded      the same, with every image decoded into memory beforehand (no JPEG decoding in the loop)
  generation   model.answer on batches encoded beforehand: the ceiling, nothing but the model
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks.common import describe_device, print_table, synchronize


class Decoded(list):
    """A selection whose records were read, images decoded, before the clock starts."""

    def __init__(self, selection, threads: int = 16):
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
            super().__init__(pool.map(selection.__getitem__, range(len(selection))))
        self.benchmark = selection.benchmark


def main(argv=None) -> None:
    from vlm.config import load_config
    from vlm.evaluate import _Prompts, generate
    from vlm.model import VisionLanguageModel
    from vlm.vqa_benchmarks import get_benchmark, select

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, help="the model (random weights are fine: speed is measured)")
    parser.add_argument("--data", required=True, help="a VQAv2-format folder (benchmarks/make_llava_data.py)")
    parser.add_argument("--questions", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = VisionLanguageModel.from_config(load_config(args.preset).model).to(device).eval()
    selection = select(get_benchmark("vqav2"), data=args.data, limit=args.questions, seed=0)
    settings = {"cot": False, "ocr": False, "batch_size": args.batch, "max_new_tokens": args.max_new_tokens}
    generate(model, select(get_benchmark("vqav2"), data=args.data, limit=2 * args.batch, seed=1), **settings)  # warm-up
    print(describe_device(device), flush=True)

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
    seconds, n = timed(lambda: sum(len(model.answer(b, max_new_tokens=args.max_new_tokens)) for b in batches))
    rows.append({"path": "generation alone", "questions": n, "s": seconds, "questions/s": n / seconds})
    for row in rows:
        row["vs decoded"] = row["questions/s"] / rows[1]["questions/s"]
        row["vs generation alone"] = row["questions/s"] / rows[2]["questions/s"]
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
