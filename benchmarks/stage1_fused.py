"""Would fused kernels bring stage 1 closer to 1.6x / 3x compiled LLaVA? The issue "Faster than the compiled peer"
names Liger's fused RMSNorm / SwiGLU / RoPE as fair game; the profile (docs/benchmarks.md, "Where stage 1's time
goes") has 11 ms of memory-bound SwiGLU, RMSNorm and RoPE passes and 14.8 ms of decoder matmuls at 59% of peak,
many of them narrow (SmolLM2-135M's k and v projections are 192 wide).

    python -m benchmarks.stage1_fused                                   # on an H100/H200, Liger installed
    python -m benchmarks.stage1_fused --tiny --steps 2 --variants bf16 "fused projections"   # CPU smoke run

Rows, each timed in this process as benchmarks/train_throughput.py times them (stage 1, bf16 autocast, random
weights, ViT-L/336 + SmolLM2-135M, batch 32): compiled LLaVA, the reference; vlm compiled as shipped; vlm with
each decoder block's q/k/v projections as one matmul and gate/up as one ("fused projections": the input's
gradient then comes out of one matmul each instead of a sum of three and of two); and vlm with Liger's kernels
in the decoder (`apply_liger_kernel_to_llama`: RMSNorm, SwiGLU, RoPE), each with and without the feature
cache. Decoder blocks stay compiled as vlm compiles them, so each row measures against inductor's own fusion.
Each row's loss on the same batch shows the variant computes the same thing.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks import train_throughput


def fuse_projections(decoder: nn.Module) -> int:
    """Each block's q/k/v and gate/up linear layers as one frozen matmul each; returns the blocks changed."""
    for block in decoder.layers:
        attention, mlp = block.self_attn, block.mlp
        attention.qkv_proj = _concatenated(attention.q_proj, attention.k_proj, attention.v_proj)
        attention.qkv_sizes = [attention.q_proj.out_features, attention.k_proj.out_features,
                               attention.v_proj.out_features]
        del attention.q_proj, attention.k_proj, attention.v_proj
        attention.forward = _fused_attention_forward.__get__(attention)
        mlp.gate_up_proj = _concatenated(mlp.gate_proj, mlp.up_proj)
        del mlp.gate_proj, mlp.up_proj
        mlp.forward = _fused_mlp_forward.__get__(mlp)
    return len(decoder.layers)


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(linear.out_features for linear in linears), bias=False,
                      device=first.weight.device, dtype=first.weight.dtype)
    fused.weight.data.copy_(torch.cat([linear.weight.data for linear in linears]))
    return fused.requires_grad_(False)


def _fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    from transformers.models.llama import modeling_llama as modeling

    for key in ("cache", "past_key_values", "past_key_value", "cache_position", "position_ids"):
        kwargs.pop(key, None)  # training: no KV cache; positions already rotated in through position_embeddings
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (part.view(hidden_shape).transpose(1, 2)
                         for part in self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1))
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    attention = modeling.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    output, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def _fused_mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def use_liger(model) -> int:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model.lm)
    return len(model.lm.get_decoder().layers)


VARIANTS = {"bf16": None, "fused projections": lambda model: fuse_projections(model.lm.get_decoder()),
            "liger": use_liger}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="in this order: Liger patches transformers' module-level RoPE for every later row")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs, to check the script runs")
    options = parser.parse_args(argv)
    train_throughput.stage1_against_compiled_llava(
        {variant: VARIANTS[variant] for variant in options.variants}, "blocks changed",
        ["--steps", str(options.steps)] + (["--tiny"] if options.tiny else []))


if __name__ == "__main__":
    main()
