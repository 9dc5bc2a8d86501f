"""Whether this machine computes in bf16 fast: what the `auto` settings of mixed precision and the LM's dtype ask.

A GPU with bf16 does, and so does a CPU with bf16 matrix instructions (AVX512-BF16: AMD Zen 4, Intel Cooper
Lake and later; AMX: Intel Sapphire Rapids and later). A CPU without them has no fast bf16 matmul in PyTorch:
on a 2-core AMD EPYC with AVX2 only (Zen 3), a stage-2 step of the offline preset took 40 s under bf16
autocast against 2.2 s in float32, while on a 2-core Zen 4 bf16 was the faster (docs/benchmarks.md,
"A CPU without bf16 instructions").
"""

from __future__ import annotations

import torch

CPU_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def compute_device() -> str:
    """Where training and inference run: the GPU if there is one (as accelerate and to_accelerator choose)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_is_fast(device: str | None = None) -> bool:
    """Whether bf16 matmuls run natively on `device` (compute_device() by default)."""
    kind = torch.device(device or compute_device()).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        # Private probes of torch.cpu (torch 2.1+); a build without them is treated as lacking the instructions.
        return any(getattr(torch.cpu, check, lambda: False)() for check in CPU_BF16_CHECKS)
    return False


def slow_bf16_warning(what: str) -> str | None:
    """A warning for bf16 asked for explicitly on a CPU without bf16 instructions, else None."""
    if compute_device() != "cpu" or bf16_is_fast("cpu"):
        return None
    return (f"{what} asks for bf16, but this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so PyTorch "
            "computes bf16 here about 18x slower than float32; use `auto`, which picks float32 on this machine")
