"""Evaluation throughput: vlm's batched greedy generation (`model.chat` on a batch, left padding)
against a per-sample loop (`model.chat` on one question at a time: batch 1), in questions/s, and
against transformers' LlavaForConditionalGeneration built from the same configs, generating the
same prompts: eager ("llava") and compiled ("llava compiled": a static KV cache, whose decoding
steps transformers' generate() compiles with CUDA graphs, CompileConfig's default "reduce-overhead").
"vlm" is vlm's default on the device: compiled decoding on a static cache on a GPU (the static cache
alone on a CPU, where nothing compiles, so the CPU run still exercises that path); "vlm eager" is
decoding="dynamic", vlm's path before compiled decoding and its CPU default, stated as a reference too.

    python -m benchmarks.eval_throughput                  # on a GPU
    python -m benchmarks.eval_throughput --preset easy-vqa-gpu   # the easy-VQA GPU preset's shape
    python -m benchmarks.eval_throughput --tiny --device cpu   # CPU smoke run (batches 1 4, 8 questions)

--preset easy-vqa-gpu: EfficientNet-Lite0 at 224 px (49 image tokens) + SmolLM2-135M, 64x64 images
(easy-VQA's), batches 1 64 128, 1024 questions, 8 new tokens (easy-VQA answers are 1-2 tokens and an
end token). LLaVA cannot host a CNN tower; its rows there use CLIP ViT-B/32 at 224 px, the same 49
image tokens, so the LM side, where generation spends its time, is the same.

Every question gets its own image (preprocessing is part of the measured time) and exactly
--new-tokens answer tokens (min_new_tokens = max_new_tokens, so random weights cannot end an
answer early and favour either side). Last, the demo's path for one question: time to the
first token and decoding tokens/s. LLaVA gets its prompts from vlm's `prepare` (the same chat
template, image placeholders and image preprocessing), so only the model and its generation differ.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import (
    LMS,
    VISION,
    against_references,
    build_llava,
    build_vlm,
    describe_device,
    print_table,
    reference_columns,
    reset_memory,
    synchronize,
    timed_answer,
    write_efficientnet,
    write_lm,
    write_vision,
)

# The references: a --systems name and the label of its rows. vlm's rows are stated against each.
REFERENCES = {"llava": "llava (transformers)", "llava compiled": "llava compiled (transformers)",
              "vlm eager": "vlm eager"}
SYSTEMS = ["vlm", *REFERENCES]
EFFICIENTNET = {"efficientnet-lite0": "vit-b32"}  # vlm's CNN tower: the CLIP tower LLaVA gets in its place
PRESETS = {
    "easy-vqa-gpu": dict(vision="efficientnet-lite0", lm="smollm2-135m", image_side=64, batches=[1, 64, 128],
                         questions=1024, new_tokens=8),
}
QUESTIONS = ["What color is the shape?", "What shape is in the image?", "How many objects are there?",
             "Is there a circle in the picture?"]


def make_questions(n: int, size: tuple[int, int] = (480, 640)) -> tuple[list[Image.Image], list[list[dict]]]:
    """`n` questions, each on its own random image of `size` (height, width)."""
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)
    ]
    conversations = [[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} Answer with a single word."}]
                     for i in range(n)]
    return images, conversations


class LlavaChat:
    """transformers' LLaVA behind the calls the measurements make (prepare, generate, chat), on the
    prompts vlm's `prepare` builds. With `compiled`, generation runs the way transformers documents for
    speed: `cache_implementation="static"`, so generate() compiles the decoding forward (CUDA graphs)."""

    def __init__(self, llava, vlm, compiled: bool, device: str):
        self.llava, self.vlm, self.compiled = llava, vlm, compiled
        self.options = {"pad_token_id": vlm.tokenizer.pad_token_id, "do_sample": False}
        if compiled:
            from transformers import CompileConfig

            config = CompileConfig()  # transformers' default: mode="reduce-overhead"
            if not device.startswith("cuda"):
                # transformers compiles only on accelerators unless told; --tiny runs on the CPU
                config._compile_all_devices = True
            self.options.update(cache_implementation="static", compile_config=config)
            # Each batch size and prompt length is a compiled variant; past dynamo's limit (8) the rest
            # would run eagerly without a word.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def prepare(self, images, conversations) -> dict:
        batch = self.vlm.prepare(images, conversations)
        batch["pixel_values"] = batch["pixel_values"].to(self.llava.dtype)
        return batch

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        """New token ids only, as vlm's generate returns them."""
        out = self.llava.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                  **self.options, **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    def chat(self, images, conversations, **generate_kwargs) -> list[str]:
        tokens = self.generate(**self.prepare(images, conversations), **generate_kwargs)
        return [text.strip() for text in self.vlm.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def check_compiled(self) -> None:
        """RuntimeError if generate() fell back to eager decoding (transformers decides per call)."""
        if self.compiled and not hasattr(self.llava, "_compiled_call"):
            raise RuntimeError("transformers' generate() did not compile the decoding forward")


class VlmChat:
    """vlm with one way of decoding (VisionLanguageModel.generate's `decoding`), behind the same calls."""

    def __init__(self, model, decoding: str):
        self.model, self.decoding = model, decoding

    def prepare(self, images, conversations) -> dict:
        return self.model.prepare(images, conversations)

    def generate(self, **inputs):
        return self.model.generate(**inputs, decoding=self.decoding)

    def chat(self, images, conversations, **generate_kwargs) -> list[str]:
        return self.model.chat(images, conversations, decoding=self.decoding, **generate_kwargs)

    def check_compiled(self) -> None:
        """RuntimeError if compiled decoding fell back to eager (transformers decides per call)."""
        if self.decoding == "compiled" and True not in self.model._greedy_decoders:
            raise RuntimeError("vlm's compiled decoding did not compile the decoding forward")


def build_llava_chat(args, vlm, compiled: bool) -> LlavaChat:
    """LLaVA from the same configs as vlm, all in bf16 for inference (no autocast, whose per-op cost
    would slow its decoding); vlm's projector stays fp32, as vlm keeps it."""
    llava = build_llava(EFFICIENTNET.get(args.vision, args.vision), args.lm, args.tiny,
                        image_token_id=vlm.processor.image_token_id, device=args.device)
    llava.to(torch.bfloat16).requires_grad_(False).eval()
    return LlavaChat(llava, vlm, compiled, args.device)


def questions_per_second(model, images, conversations, batch: int, new_tokens: int, device: str) -> float:
    import time

    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    # Untimed, every prompt shape the timed pass meets, so none (and, compiled, no graph) is new while
    # timing: the questions repeat every len(QUESTIONS), so the batches in the first lcm(batch,
    # len(QUESTIONS)) questions have every padded length; then a last, shorter batch if there is one.
    starts = list(range(0, len(images), batch))
    for i in starts[:math.lcm(batch, len(QUESTIONS)) // batch] + (starts[-1:] if len(images) % batch else []):
        model.chat(images[i:i + batch], conversations[i:i + batch], **generate)
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


def measure(model, system: str, images, conversations, args) -> tuple[list[dict], dict]:
    """One system's batched rows (questions/s at each batch size) and its streaming latency."""
    rows = []
    for batch in args.batches:
        n = max(batch, args.questions)
        rate = questions_per_second(model, images[:n], conversations[:n], batch, args.new_tokens, args.device)
        model.check_compiled()
        rows.append({"system": system, "batch": batch, "questions": n, "questions/s": rate,
                     "vs per-sample loop": rate / rows[0]["questions/s"] if rows else 1.0})
        print(json.dumps(rows[-1]), flush=True)
    latency = {"system": system, **stream_latency(model, images[0], conversations[0], args.stream_tokens, repeats=5)}
    print(json.dumps(latency), flush=True)
    return rows, latency


BATCH_RATIOS = {"questions/s": "questions/s"}
STREAM_RATIOS = {"time to first token ms": "time to first token", "tokens/s": "decoding tokens/s"}


def ratios(rows: list[dict], latency: list[dict]) -> tuple[list[dict], list[dict]]:
    """vlm's rows over each reference's row at the same batch size, its streaming latency over theirs;
    "llava compiled" is stated against "llava" too, and "vlm eager" against both LLaVA rows."""
    return (against_references(rows, REFERENCES, ["batch"], BATCH_RATIOS),
            against_references(latency, REFERENCES, [], STREAM_RATIOS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a preset's shape (see the module's docstring); the flags below override it")
    parser.add_argument("--vision", choices=[*VISION, *EFFICIENTNET], default="vit-l14-336")
    parser.add_argument("--lm", choices=list(LMS), default="smollm2-135m")
    parser.add_argument("--image-side", type=int, help="square images of this side; default 640x480 photos")
    # Batch 1 is the per-sample loop the other rows are compared with.
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 2 4 8 16 32 64; 1 4 with --tiny")
    parser.add_argument("--questions", type=int,
                        help="questions per measurement (at least the batch); default: 32, 8 with --tiny")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=64, help="answer length for the streaming latency")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS,
                        help="vlm always runs; the compiled ones compile generation in their warm-up")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs, to check the script runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with a --preset's values for those not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.tiny and args.vision in EFFICIENTNET:
        parser.error(f"--tiny swaps in tiny CLIP towers; {args.vision} has no tiny config, so run it without --tiny")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # --tiny checks that the script runs: a small grid keeps it quick with compiled LLaVA on a CPU.
    args.batches = args.batches or ([1, 4] if args.tiny else [1, 2, 4, 8, 16, 32, 64])
    args.questions = args.questions or (8 if args.tiny else 32)

    print(describe_device(args.device), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vision = (write_efficientnet(args.vision, root) if args.vision in EFFICIENTNET
                  else write_vision(args.vision, root, args.tiny))
        model = build_vlm(vision, write_lm(args.lm, root, args.tiny), args.device)
    model.eval()
    decoding = "compiled" if args.device.startswith("cuda") else "static"
    side = f"{args.image_side}x{args.image_side}" if args.image_side else "640x480"
    print(
        f"{args.vision} + {args.lm}{' (tiny configs)' if args.tiny else ''}, bf16 backbones, greedy, "
        f"{args.new_tokens} new tokens per answer, {side} images; vlm decoding: {decoding}",
        flush=True,
    )

    size = (args.image_side, args.image_side) if args.image_side else (480, 640)
    images, conversations = make_questions(max(args.questions, *args.batches), size)
    rows, latency = [], []
    # vlm first: LLaVA's prompts come from vlm's processor, so vlm stays loaded throughout.
    for system in [name for name in SYSTEMS if name == "vlm" or name in args.systems]:
        reset_memory(args.device, forget_compiled=True)
        if system.startswith("vlm"):
            chat = VlmChat(model, decoding if system == "vlm" else "dynamic")
        else:
            chat = build_llava_chat(args, model, compiled=system == "llava compiled")
        label = REFERENCES.get(system, system)
        try:
            system_rows, system_latency = measure(chat, label, images, conversations, args)
        except Exception as error:  # compiled generation is transformers' to support; the others must work
            if system != "llava compiled":
                raise
            print(f"llava compiled: left out, compiled generation failed: {type(error).__name__}: "
                  f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}", flush=True)
            continue
        finally:
            del chat
        rows += system_rows
        latency.append(system_latency)
    present = sorted({name for name, label in REFERENCES.items() if any(r["system"] == label for r in rows)})
    batch_ratios, stream_ratios = ratios(rows, latency)
    print()
    print_table(rows, ["system", "batch", "questions", "questions/s", "vs per-sample loop"])
    print()
    print_table(batch_ratios, ["system", "batch", *reference_columns(REFERENCES, present, BATCH_RATIOS)])
    print()
    print_table(latency, ["system", "time to first token ms", "tokens/s"])
    print()
    print_table(stream_ratios, ["system", *reference_columns(REFERENCES, present, STREAM_RATIOS)])
    if args.json:
        args.json.write_text(json.dumps({"batched": rows, "stream": latency, "batched ratios": batch_ratios,
                                         "stream ratios": stream_ratios}, indent=1))


if __name__ == "__main__":
    main()
