"""The fused-projection diagnostic (benchmarks/stage1_fused.py): a decoder whose q/k/v and gate/up layers run as one
matmul each computes what the original does, and the same gradient for its input embeddings (what the projector
trains on)."""

from __future__ import annotations

import torch

from benchmarks import stage1_fused
from benchmarks.common import lm_config
from vlm.testing import tiny_chat_tokenizer


def test_fused_projections_compute_the_decoders_output_and_input_gradient():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = lm_config("smollm2-135m", True, tiny_chat_tokenizer())
    config._attn_implementation = "sdpa"
    original = LlamaForCausalLM(config).eval().requires_grad_(False)
    fused = LlamaForCausalLM(config).eval().requires_grad_(False)
    fused.load_state_dict(original.state_dict())
    assert stage1_fused.fuse_projections(fused.model) == config.num_hidden_layers
    assert not hasattr(fused.model.layers[0].self_attn, "k_proj")  # the fused layer is what runs

    embeds = torch.randn(2, 7, config.hidden_size)
    upstream = torch.randn(2, 7, config.hidden_size)
    results = []
    for model in (original, fused):
        inputs = embeds.clone().requires_grad_(True)
        hidden = model.model(inputs_embeds=inputs).last_hidden_state
        hidden.backward(upstream)
        results.append((hidden.detach(), inputs.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
