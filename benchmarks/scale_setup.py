"""Everything `vlm train` needs to run LLaVA-1.5's data path at real scale without the Hub: HF CLIP
ViT-L/14-336 and SmolLM2-135M built from their published configs (random weights: speed does not
depend on them), saved to local folders, a generated LLaVA-format dataset, and a preset naming both.

    python -m benchmarks.scale_setup --out runs/scale --images 100000 --tokenizer DIR
    vlm train --config runs/scale/llava-scale.yaml --stage align          # the preset, no other flag

--tokenizer: a folder holding SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json,
chat_template.jinja), such as the one vlm caches for `packaged:smollm2-135m-instruct`
(~/.cache/vlm/models/smollm2-135m-instruct), so sequence lengths are the real tokenizer's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from benchmarks import make_llava_data
from benchmarks.common import LMS, vision_config


def write_backbones(out: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    vision_dir, lm_dir = out / "vision-vit-l14-336", out / "lm-smollm2-135m"
    if not (vision_dir / "config.json").is_file():
        config = vision_config("vit-l14-336", tiny=False)
        CLIPVisionModel(config).save_pretrained(vision_dir)
        size = config.image_size
        # openai/clip-vit-large-patch14-336's preprocessing: shortest side to 336, centre crop, CLIP mean/std.
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            vision_dir
        )
    if not (lm_dir / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(**LMS["smollm2-135m"], tie_word_embeddings=True, max_position_embeddings=8192,
                             rope_theta=100000.0, rms_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(lm_dir)
        tokenizer.save_pretrained(lm_dir)
    return vision_dir, lm_dir


def write_preset(out: Path, vision_dir: Path, lm_dir: Path, data_dir: Path) -> Path:
    """LLaVA-1.5's stage settings on these folders: batch 32 per step, one epoch, LR 1e-3 then 2e-4."""
    preset = {
        "model": {
            "vision": {"backend": "hf", "name": str(vision_dir.resolve()), "feature_layer": -2},
            "projector": {"type": "mlp2x_gelu"},
            "lm": {"name": str(lm_dir.resolve()), "dtype": "bfloat16"},
        },
        "data": {
            "align": {"kind": "llava", "path": str((data_dir / "llava_pretrain.json").resolve()),
                      "image_root": str((data_dir / "images").resolve())},
            "instruct": {"kind": "llava", "path": str((data_dir / "llava_instruct.json").resolve()),
                         "image_root": str((data_dir / "images").resolve())},
            "max_length": 2048,
            "val_fraction": 0.002,
        },
        "train": {
            "output_dir": str((out / "run").resolve()),
            "align": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.03},
            "instruct": {"epochs": 1, "batch_size": 16, "grad_accum": 2, "lr": 2e-4, "warmup_ratio": 0.03,
                         "train_lm": "lora"},
            "log_every": 20,
            "eval_every": 100000,
            "save_every": 1000,
        },
    }
    path = out / "llava-scale.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with SmolLM2's tokenizer files")
    parser.add_argument("--workers", type=int, default=None, help="data generation processes (default: all cores)")
    parser.add_argument("--vqa-questions", type=int, default=20_000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vision_dir, lm_dir = write_backbones(args.out, args.tokenizer)
    data_dir = args.out / "data"
    if not (data_dir / "manifest.json").is_file():
        generate = ["--out", str(data_dir), "--images", str(args.images), "--no-parquet", "--overwrite",
                    "--vqa-questions", str(args.vqa_questions)]
        make_llava_data.main(generate + (["--workers", str(args.workers)] if args.workers else []))
    print(write_preset(args.out, vision_dir, lm_dir, data_dir))


if __name__ == "__main__":
    main()
