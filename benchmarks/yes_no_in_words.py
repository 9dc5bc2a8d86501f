"""How many steps the offline preset's LoRA needs to learn easy-VQA's yes/no check when the picture is given in
words: SmolLM2-135M alone, trained on "A blue rectangle.\\nis there a red shape?" -> "no", no image at all.

    python -m benchmarks.yes_no_in_words --seeds 0 1 2 3            # on a GPU; a CPU takes about 2 s a step
    python -m benchmarks.yes_no_in_words --seeds 0 --captions none  # the question alone: what the prior reaches

Stage 2 as `vlm train --config offline` runs it (batch, its optimizer and schedule, LoRA on every linear layer of
the blocks the preset adapts, its system prompt, one question per conversation), in float32 and eagerly, for 981
steps by default (the preset's stage 2 before `described`). Prints the share of 600 easy-VQA test yes/no
questions answered right (the "yes" logit against the "no" logit after the generation prompt) at each checkpoint
step: where it rises early, the LM can learn the check quickly once it can read the picture's colour and shape as
words.
"""

from __future__ import annotations

import argparse
import random

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.common import describe_device, print_table
from vlm.config import load_config
from vlm.data.easy_vqa import describe, easy_vqa_questions
from vlm.language_model import load_language_model
from vlm.processor import VLMProcessor
from vlm.train.trainer import build_optimizer, lora_targets

CHECKPOINTS = (50, 100, 150, 200, 300, 400, 600, 800)


def run(seed: int, steps: int, with_captions: bool, device: str) -> dict[int, float]:
    config = load_config("offline", ["model.lm.dtype=float32"])
    stage = config.train.instruct
    torch.manual_seed(seed)
    lm, tokenizer = load_language_model(config.model.lm)
    # Prompts and labels as `vlm train` encodes a conversation without an image.
    processor = VLMProcessor(tokenizer, image_transform=None, num_image_tokens=0,
                             system_prompt=config.model.lm.system_prompt)
    lm = get_peft_model(lm, LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha,
                                       target_modules=lora_targets(lm, stage.lora_layers), task_type="CAUSAL_LM"))
    lm.to(device)
    train, test = easy_vqa_questions("train"), easy_vqa_questions("test")
    train_captions, test_captions = describe(train), describe(test)
    train = [r for r in train if r["image_id"] in train_captions]
    random.Random(seed).shuffle(train)
    test = [r for r in test if r["image_id"] in test_captions and r["answer"] in ("yes", "no")]
    random.Random(0).shuffle(test)
    test = test[:600]
    yes, no = tokenizer.encode("yes")[0], tokenizer.encode("no")[0]

    def asked(captions: dict, record: dict) -> list[dict]:
        question = record["question"]
        return [{"role": "user", "content": f"{captions[record['image_id']]}\n{question}" if with_captions
                 else question}]

    @torch.no_grad()
    def yes_no_accuracy() -> float:
        lm.eval()
        right = 0
        for i in range(0, len(test), 100):
            records = test[i:i + 100]
            batch = processor.pad([processor.encode(asked(test_captions, r), add_generation_prompt=True)
                                   for r in records], padding_side="left")
            logits = lm(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device)).logits[:, -1]
            said = torch.where(logits[:, yes] > logits[:, no], 1, 0).tolist()
            right += sum(s == (r["answer"] == "yes") for s, r in zip(said, records, strict=True))
        lm.train()
        return 100 * right / len(test)

    # One epoch of `steps` batches: the optimizer and schedule `vlm train` builds for them.
    optimizer, scheduler, _ = build_optimizer([p for p in lm.parameters() if p.requires_grad], stage, steps)
    curve = {}
    lm.train()
    for step in range(steps):
        records = train[step * stage.batch_size:(step + 1) * stage.batch_size]
        batch = processor.pad([processor.encode([*asked(train_captions, r),
                                                 {"role": "assistant", "content": r["answer"]}]) for r in records])
        lm(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step + 1 in CHECKPOINTS or step + 1 == steps:
            curve[step + 1] = yes_no_accuracy()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=981)
    parser.add_argument("--captions", choices=["text", "none"], default="text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(describe_device(args.device))
    curves = {seed: run(seed, args.steps, args.captions == "text", args.device) for seed in args.seeds}
    named = {f"seed {seed}: yes/no %": curve for seed, curve in curves.items()}
    steps = sorted({s for curve in curves.values() for s in curve})
    print_table([{"step": step, **{name: f"{curve[step]:.1f}" for name, curve in named.items()}} for step in steps],
                ["step", *named])


if __name__ == "__main__":
    main()
