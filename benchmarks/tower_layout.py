"""The EfficientNet-Lite tower's images/s with its convolutions on NCHW tensors against NHWC (channels_last, as
vlm runs it): what the feature cache build, `vlm eval` and the demo spend on each picture.

    python -m benchmarks.tower_layout                       # the offline preset's tower on this machine's CPU
    python -m benchmarks.tower_layout --device cuda --dtype bfloat16 --batch 256 config=easy-vqa-gpu

The two layouts take turns, `--batches` batches each per round, so a machine that slows down during the run
slows both; the table gives the median batch over all rounds, the ratio, and the largest difference between
the two layouts' features (the same weights, so only rounding differs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import describe_device, print_table, synchronize


def main(argv=None) -> None:
    from vlm.config import load_config
    from vlm.vision import build_vision_encoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="config=PRESET (default offline), then key=value overrides")
    args = parser.parse_args(argv)
    preset = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("config=")), "offline")
    config = load_config(preset, [o for o in args.overrides if not o.startswith("config=")])
    if config.model.vision.backend != "efficientnet":
        parser.error(f"{preset}'s tower is {config.model.vision.backend}, not an EfficientNet-Lite")

    dtype = getattr(torch, args.dtype)
    encoder = build_vision_encoder(config.model.vision).eval().to(args.device, dtype)
    nchw = build_vision_encoder(config.model.vision).eval().to(args.device, dtype)
    nchw.tower.to(memory_format=torch.contiguous_format)  # a convolution's output takes its weight's layout
    size = encoder.image_size
    pixels = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype)
    layouts = {
        "NCHW": lambda: nchw(pixels),
        "NHWC (channels_last, vlm)": lambda: encoder(pixels),
    }
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    with torch.no_grad():
        difference = (layouts["NCHW"]().float() - encoder(pixels).float()).abs().max().item()
        for round_ in range(args.rounds + 1):  # round 0 warms up (oneDNN primitives, cuDNN plans)
            for name, run in layouts.items():
                for _ in range(args.batches):
                    synchronize(args.device)
                    start = time.perf_counter()
                    run()
                    synchronize(args.device)
                    if round_:
                        seconds[name].append(time.perf_counter() - start)

    print(f"{describe_device(args.device)}, {torch.get_num_threads()} threads; {preset}'s {config.model.vision.name} "
          f"at {size} px, {args.dtype}, batch {args.batch}; {args.rounds} rounds of {args.batches} batches each; "
          f"largest feature difference {difference:.2e}")
    base = statistics.median(seconds["NCHW"])
    print_table([{"layout": name, "images/s": args.batch / statistics.median(seconds[name]),
                  "vs NCHW": base / statistics.median(seconds[name])} for name in layouts],
                ["layout", "images/s", "vs NCHW"])


if __name__ == "__main__":
    main()
