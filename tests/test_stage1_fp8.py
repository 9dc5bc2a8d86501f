"""The FP8 diagnostic (benchmarks/stage1_fp8.py): a frozen linear layer in FP8 computes what the layer does, and
the input's gradient, within FP8's precision, and the benchmark states each row against compiled LLaVA."""

from __future__ import annotations

import pytest
import torch

from benchmarks import stage1_fp8
from tests.test_benchmarks_throughput import find, tables


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.detach().float() - exact.detach()).norm() / exact.detach().norm())


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_the_layer_and_its_input_gradient_within_fp8_precision(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=bias)
    linear.weight.data[:, 3] *= 30  # a large input column: per-column scales in the backward pass must cope
    x = torch.randn(2, 5, 64)
    upstream = torch.randn(2, 5, 48)

    exact_x = x.clone().requires_grad_(True)
    exact = linear(exact_x)
    exact.backward(upstream)

    fp8 = stage1_fp8.Fp8FrozenLinear(linear)
    fp8_x = x.to(torch.bfloat16).requires_grad_(True)
    out = fp8(fp8_x)
    out.backward(upstream.to(torch.bfloat16))

    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    # e4m3 keeps 3 mantissa bits: each value within 1/16 relative, errors averaging out over a dot product.
    assert relative_error(out, exact.detach()) < 0.05
    assert relative_error(fp8_x.grad, exact_x.grad) < 0.05
    assert not list(fp8.parameters())  # frozen: nothing for an optimizer to find


def test_to_fp8_swaps_the_linear_layers_fp8_matmuls_take_and_leaves_the_rest():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(16, 10)))
    assert stage1_fp8.to_fp8(model) == 2
    assert isinstance(model[0], stage1_fp8.Fp8FrozenLinear)
    assert isinstance(model[2][0], stage1_fp8.Fp8FrozenLinear)
    assert type(model[2][1]) is torch.nn.Linear  # 10 outputs: not a multiple of 16


def test_stage1_fp8_states_each_row_against_compiled_llava(capsys):
    stage1_fp8.main(["--tiny", "--steps", "1", "--variants", "bf16", "fp8 both"])
    (rows,) = tables(capsys.readouterr().out)
    reference = float(find(rows, system="llava compiled")["step ms"])
    for system in ["vlm compiled, bf16", "vlm compiled, fp8 both + feature cache"]:
        row = find(rows, system=system)
        # The printed cells keep 3 significant figures: the ratio of the two printed times agrees to their rounding.
        assert float(row["vs llava compiled"]) == pytest.approx(reference / float(row["step ms"]), rel=0.01)
    assert find(rows, system="vlm compiled, bf16")["fp8 linears"] == "0"
    assert int(find(rows, system="vlm compiled, fp8 both")["fp8 linears"]) > 0
