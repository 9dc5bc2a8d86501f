"""Would FP8 matmuls in the frozen backbones bring stage 1 closer to 1.6x / 3x compiled LLaVA? A question the
issue "Faster than the compiled peer" asked of the profile: the decoder's and the tower's matmuls are the
largest GPU work of the step (docs/benchmarks.md, "Where stage 1's time goes").

    python -m benchmarks.stage1_fp8                    # on an H100/H200: ViT-L/336 + SmolLM2-135M, batch 32
    python -m benchmarks.stage1_fp8 --tiny --steps 2   # CPU smoke run on tiny configs

Rows, each timed in this process as benchmarks/train_throughput.py times them (stage 1, bf16 autocast, random
weights): compiled LLaVA, the reference; vlm compiled; and vlm compiled with the frozen tower's, the decoder's,
or both's linear layers in FP8 (e4m3, one scale per row: the weights quantised once, since they never change;
activations, and the gradients the projector needs, per row at every step), with and without the feature
cache. Each row's loss on the same batch shows what FP8 costs in precision.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks import train_throughput

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
VARIANTS = {"bf16": (), "fp8 tower": ("tower",), "fp8 decoder": ("decoder",), "fp8 both": ("tower", "decoder")}


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and float32 scales [rows, 1] so that values * scales approximates x, row by row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x / scale).to(FP8), scale


class _Fp8Matmul(torch.autograd.Function):
    """x @ w.T in FP8, and the gradient for x (the weight is frozen: no gradient for it)."""

    @staticmethod
    def forward(ctx, x, w_rows, w_row_scales, w_columns, w_column_scales):
        ctx.save_for_backward(w_columns, w_column_scales)
        values, scales = quantise_rows(x)
        return torch._scaled_mm(values, w_rows.t(), scale_a=scales, scale_b=w_row_scales, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        w_columns, w_column_scales = ctx.saved_tensors
        values, scales = quantise_rows(grad.contiguous())
        grad_x = torch._scaled_mm(values, w_columns.t(), scale_a=scales, scale_b=w_column_scales,
                                  out_dtype=torch.bfloat16)
        return grad_x, None, None, None, None


class Fp8FrozenLinear(nn.Module):
    """A frozen nn.Linear with its weight stored twice in FP8: scaled per output row for the forward pass and
    per input column for the input's gradient, each laid out as torch._scaled_mm wants its second operand."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        w_rows, row_scales = quantise_rows(weight)
        w_columns, column_scales = quantise_rows(weight.t().contiguous())
        self.register_buffer("w_rows", w_rows)  # [out, in]
        self.register_buffer("w_row_scales", row_scales.t().contiguous())  # [1, out]
        self.register_buffer("w_columns", w_columns)  # [in, out]
        self.register_buffer("w_column_scales", column_scales.t().contiguous())  # [1, in]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = _Fp8Matmul.apply(rows, self.w_rows, self.w_row_scales, self.w_columns, self.w_column_scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def to_fp8(module: nn.Module) -> int:
    """Swap every nn.Linear under `module` whose sizes FP8 matmuls take (multiples of 16); returns how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, Fp8FrozenLinear(child))
            swapped += 1
        else:
            swapped += to_fp8(child)
    return swapped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs, to check the script runs")
    options = parser.parse_args(argv)

    def change(parts):
        return lambda model: sum(to_fp8({"tower": model.vision.tower, "decoder": model.lm.get_decoder()}[part])
                                 for part in parts)

    train_throughput.stage1_against_compiled_llava(
        {variant: change(VARIANTS[variant]) for variant in options.variants}, "fp8 linears",
        ["--steps", str(options.steps)] + (["--tiny"] if options.tiny else []))


if __name__ == "__main__":
    main()
