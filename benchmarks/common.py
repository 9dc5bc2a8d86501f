"""Shared pieces of the benchmarks: real-architecture backbones with random weights (speed does not
depend on the weights), the vlm model and the transformers LLaVA reference built from the same
configs, a FLOP count for model FLOPs utilisation, timing and table printing."""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from vlm.testing import tiny_chat_tokenizer

# Architectures of the published checkpoints (openai/clip-vit-large-patch14-336, openai/clip-vit-base-patch16,
# HuggingFaceTB/SmolLM2-135M-Instruct, HuggingFaceTB/SmolLM2-360M-Instruct); --tiny swaps in CPU-sized ones.
VISION = {
    "vit-l14-336": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        patch_size=14, image_size=336),
    "vit-b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    patch_size=16, image_size=224),
    # openai/clip-vit-base-patch32: 49 patch tokens at 224 px, as many as EfficientNet-Lite0's 7x7 feature map.
    "vit-b32": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    patch_size=32, image_size=224),
}
LMS = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152),
    "smollm2-360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         intermediate_size=2560, vocab_size=49152),
}
TINY_VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, patch_size=8,
                   image_size=32)
TINY_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, vocab_size=512)

# Dense bf16 tensor-core peak of an H100 SXM (the datasheet figure MFU is quoted against).
PEAK_FLOPS = 989e12
FEATURE_LAYER = -2  # LLaVA's choice; vlm's default too

def vision_config(name: str, tiny: bool):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**(TINY_VISION if tiny else VISION[name]))


def lm_config(name: str, tiny: bool, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY_LM if tiny else LMS[name]), tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def write_vision(name: str, root: Path, tiny: bool) -> Path:
    """A random CLIP vision tower + its image processor, where vlm's hf backend loads them from."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    path = root / f"vision-{name}"
    if not path.exists():
        config = vision_config(name, tiny)
        CLIPVisionModel(config).save_pretrained(path)
        size = config.image_size
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            path
        )
    return path


def write_lm(name: str, root: Path, tiny: bool) -> Path:
    """A random Llama with SmolLM2's shape and a chat-template tokenizer, saved in bf16."""
    from transformers import LlamaForCausalLM

    path = root / f"lm-{name}"
    if not path.exists():
        tokenizer = tiny_chat_tokenizer()
        LlamaForCausalLM(lm_config(name, tiny, tokenizer)).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def write_efficientnet(name: str, root: Path) -> Path:
    """Random EfficientNet-Lite weights (the easy-VQA presets' tower), where vlm's efficientnet backend reads them."""
    from efficientnet_lite_pytorch import EfficientNet

    path = root / f"{name}.pth"
    if not path.exists():
        torch.save(EfficientNet.from_name(name).state_dict(), path)
    return path


def build_vlm(vision: Path, lm_dir: Path, device: str):
    """vlm through its own loading path; frozen backbones in bf16, the projector in fp32. `vision` is an HF
    tower's folder (write_vision) or EfficientNet-Lite weights (write_efficientnet)."""
    from vlm.config import LMConfig, ModelConfig, VisionConfig
    from vlm.model import VisionLanguageModel

    if vision.suffix == ".pth":
        tower = VisionConfig(backend="efficientnet", name=vision.stem, pretrained=str(vision))
    else:
        tower = VisionConfig(backend="hf", name=str(vision), feature_layer=FEATURE_LAYER)
    config = ModelConfig(vision=tower, lm=LMConfig(name=str(lm_dir), dtype="bfloat16"))
    model = VisionLanguageModel.from_config(config).to(device)
    model.vision.to(torch.bfloat16)
    return model


def build_llava(vision_name: str, lm_name: str, tiny: bool, image_token_id: int, device: str):
    """transformers' LLaVA from the same configs: bf16 backbones, fp32 projector, only the projector trainable."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny_chat_tokenizer()
    config = LlavaConfig(
        vision_config=vision_config(vision_name, tiny),
        text_config=lm_config(lm_name, tiny, tokenizer),
        projector_hidden_act="gelu",
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        image_token_index=image_token_id,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.to(torch.bfloat16).requires_grad_(False)
    model.model.multi_modal_projector.float().requires_grad_(True)
    return model


def add_lora(lm: torch.nn.Module) -> None:
    """LoRA r=16 on the LM's attention projections, adapters in fp32 (the same call on both sides)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(
        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), lm
    )
    for name, p in lm.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


# ---- model FLOPs ---------------------------------------------------------------------------------

def vision_forward_flops(config, layers: int) -> float:
    """One image through patch embedding and `layers` transformer blocks (matmuls + attention)."""
    d, ff = config.hidden_size, config.intermediate_size
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    patch_embed = 2 * patches * 3 * config.patch_size**2 * d
    block = 2 * tokens * (4 * d * d + 2 * d * ff) + 4 * tokens**2 * d
    return patch_embed + layers * block


def lm_forward_flops(config, tokens: int) -> tuple[float, float]:
    """(linear-layer FLOPs, causal-attention FLOPs) of one sequence through the decoder blocks."""
    d, ff = config.hidden_size, config.intermediate_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    linear = config.num_hidden_layers * 2 * tokens * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attention = config.num_hidden_layers * 2 * tokens**2 * d  # QK^T and AV, half the square (causal)
    return linear, attention


def train_flops_per_sample(vision_cfg, lm_cfg, seq_len: int, image_tokens: int, supervised: int,
                           cached: bool, lora_r: int = 0) -> float:
    """Model FLOPs one training sample needs, the same count for vlm and LLaVA.

    forward: vision blocks up to the feature layer (none with cached features), projector, decoder,
    LM head at the supervised positions (all the loss needs). backward: projector and LoRA 2x their
    forward (input and weight gradients); frozen decoder linears and LM head 1x (input gradients only);
    attention 2x.
    """
    d_lm = lm_cfg.hidden_size
    vision = 0.0 if cached else vision_forward_flops(vision_cfg, vision_cfg.num_hidden_layers + 1 + FEATURE_LAYER)
    projector = 2 * image_tokens * (vision_cfg.hidden_size * d_lm + d_lm * d_lm)
    linear, attention = lm_forward_flops(lm_cfg, seq_len)
    head = 2 * supervised * d_lm * lm_cfg.vocab_size
    kv = d_lm // lm_cfg.num_attention_heads * lm_cfg.num_key_value_heads
    lora = lm_cfg.num_hidden_layers * 2 * seq_len * lora_r * (2 * (d_lm + d_lm) + 2 * (d_lm + kv))
    return vision + 3 * projector + 2 * linear + 3 * attention + 2 * head + 3 * lora


# ---- timing and reporting ------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call of fn, averaged over `repeats` calls after the caller's warm-up."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def reset_memory(device: str, forget_compiled: bool = False) -> None:
    """Start a new peak. `forget_compiled` also drops compiled graphs and the memory pools their
    CUDA graphs keep, which would otherwise stay reserved into the next model's figures."""
    import gc

    if forget_compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak memory reserved on the GPU, not only allocated: replaying a CUDA graph allocates nothing,
    its pool is reserved once, so the allocated counter alone would miss it."""
    return torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else float("nan")


def describe_device(device: str) -> str:
    import transformers

    where = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A Markdown table, ready to paste into docs/benchmarks.md."""
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(" --- " for _ in columns) + "|")
    for line in cells:
        print("| " + " | ".join(line) + " |")


def against_references(rows: list[dict], references: dict[str, str], match: list[str],
                       measures: dict[str, str]) -> list[dict]:
    """Each row over each reference row that matches it on the `match` fields: for a measure `key` with
    title `name`, `"{name} vs {reference}"` = row[key] / reference_row[key].

    `references` maps a short name to the system label of its rows, in order: the first is the base,
    and a reference row is stated only against the references before it (never against itself).
    Rows with no reference in the run are left out.
    """
    labels = list(references.values())
    out = []
    for row in rows:
        before = labels.index(row["system"]) if row["system"] in labels else len(labels)
        ratio = {}
        for name, label in list(references.items())[:before]:
            ref = next((r for r in rows if r["system"] == label and all(r[k] == row[k] for k in match)), None)
            if ref is not None:
                ratio.update({f"{title} vs {name}": row[key] / ref[key] for key, title in measures.items()})
        if ratio:
            out.append({**{k: row[k] for k in match}, "system": row["system"], **ratio})
    return out


def reference_columns(references: dict[str, str], present: list[str], measures: dict[str, str]) -> list[str]:
    """against_references' ratio columns for the references among `present` (their short names)."""
    names = [name for name in references if name in present]
    return [f"{title} vs {name}" for title in measures.values() for name in names]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


class TokenClock(BaseStreamer):
    """A generate() streamer that records when each new token leaves; the first put() is the prompt.

    Token arrival is read from the streamer hook rather than from decoded text: the ids of a
    random-weight LM often decode to nothing in a small benchmark tokenizer.
    """

    def __init__(self):
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def timed_answer(model, image, conversation: list[dict], new_tokens: int) -> dict:
    """The demo's path (prepare + generate with a streamer): seconds from the request, image
    preprocessing and prompt encoding included, to the first new token; then the decode rate."""
    start = time.perf_counter()
    clock = TokenClock()
    model.generate(**model.prepare([image], [conversation]), streamer=clock, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens)
    first, last = clock.times[0], clock.times[-1]
    return {"ttft": first - start, "rate": (len(clock.times) - 1) / (last - first), "tokens": len(clock.times)}
