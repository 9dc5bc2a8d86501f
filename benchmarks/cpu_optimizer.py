"""The offline preset's stage-2 step on this machine's CPU with AdamW as a loop of ops per tensor (torch's
default on a CPU) against fused AdamW (vlm's): the whole step and the optimizer step alone.

    python -m benchmarks.cpu_optimizer --rounds 4 --steps 5

One batch of 8 easy-VQA training conversations, encoded as training encodes them, on the packaged
EfficientNet-Lite0 + SmolLM2-135M with LoRA on every block, as `vlm train --config offline` builds them
(the LM in the dtype `auto` picks; no autocast, which that preset only applies on a CPU with bf16 instructions).
The two optimizers take turns, `--steps` steps each per round, so a machine that slows down during the run
slows both; the table gives the median over all rounds and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import describe_device, print_table
from vlm.config import load_config
from vlm.data.sources import load_examples
from vlm.model import VisionLanguageModel
from vlm.train.trainer import configure_trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the offline preset")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config("offline", args.overrides)
    model = VisionLanguageModel.from_config(config.model)
    model.train()
    trainable = configure_trainable(model, config.train.instruct)
    records = load_examples(config.data.instruct, "instruct", config.model.lm.short_answer_prompt)
    examples = [records[i] for i in range(config.train.instruct.batch_size)]
    batch = model.processor.pad([model.processor.encode(e.messages) for e in examples])
    batch.update(model.processor.training_positions(batch))
    with torch.no_grad():
        batch["image_features"] = model.image_features(model.processor.image_transform([e.load() for e in examples]))

    optimizers = {
        "AdamW, a loop per tensor": torch.optim.AdamW(trainable, lr=1e-5, foreach=False),
        "AdamW, fused": torch.optim.AdamW(trainable, lr=1e-5, fused=True),
    }
    steps: dict[str, list[float]] = {name: [] for name in optimizers}
    updates: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(args.rounds + 1):  # round 0 warms up (allocations, optimizer state)
        for name, optimizer in optimizers.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                model(**batch)["loss"].backward()
                update = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad()
                end = time.perf_counter()
                if round_:
                    steps[name].append(end - start)
                    updates[name].append(end - update)

    print(f"{describe_device('cpu')}, {torch.get_num_threads()} threads; batch {len(examples)}, "
          f"{batch['input_ids'].shape[1]} tokens a row, {len(trainable)} trainable tensors; "
          f"{args.rounds} rounds of {args.steps} steps each")
    base = statistics.median(steps[next(iter(optimizers))])
    print_table([{"optimizer": name, "step ms": 1e3 * statistics.median(steps[name]),
                  "optimizer step ms": 1e3 * statistics.median(updates[name]),
                  "step vs loop": statistics.median(steps[name]) / base} for name in optimizers],
                ["optimizer", "step ms", "optimizer step ms", "step vs loop"])


if __name__ == "__main__":
    main()
