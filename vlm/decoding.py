"""Batched greedy decoding on a static KV cache, written here rather than through transformers' generate().

On an H100 (EfficientNet-Lite0 + SmolLM2-135M, batch 64, 8 new tokens, inputs already on the GPU), generate()
on a static cache with its compiled decoding step took 94 ms a batch; this loop, with the same compiled step
and an eager prefill, 60 ms (1,060 questions/s), the same tokens as eager decoding (docs/benchmarks.md, run 8);
with the prefill a graph too, 39 ms. The prefill graph is kept at a few padded prompt lengths (run 9).
generate()'s per-step Python (logits processors, stopping criteria, cache bookkeeping) costs more than a small
LM's step in a CUDA graph. generate() keeps everything else: sampling, stopping criteria and configured logits
processors. Greedy answers stream from here too (the demo's default), through the same streamer interface.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import defaultdict
from concurrent.futures import Future

import torch

# Settings this loop reads; a call with any other (sampling, stopping criteria) goes to generate().
GREEDY_SETTINGS = {"max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", "do_sample", "temperature",
                   "top_p", "top_k", "streamer"}
# Generation-config fields whose non-default values would make generate() change greedy tokens.
LOGITS_CHANGING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                   "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
                   "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
                   "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None}


def is_plain_greedy(generate_kwargs: dict, generation_config) -> bool:
    """Whether the call asks for nothing but greedy tokens, as this loop makes them."""
    if set(generate_kwargs) - GREEDY_SETTINGS or generate_kwargs.get("do_sample"):
        return False
    return all(getattr(generation_config, key, None) in (default, None) for key, default in LOGITS_CHANGING.items())


def prefill_length(length: int) -> int:
    """The prompt length a compiled prefill pads to: the next power of two from 64, so that a demo's growing
    conversation or an eval's batches meet a handful of shapes (each compiles and records a graph once)."""
    return max(64, 1 << (length - 1).bit_length())


class GreedyDecoder:
    """Prefill, then one token per step for every row, on a caller's StaticCache; compiled, the prefill and the
    step are CUDA graphs per shape (torch.compile's "reduce-overhead"), recorded on first use. A compiled
    prefill needs its prompts left-padded to `prefill_length` (the model does so), so shapes stay few."""

    def __init__(self, lm, cache_argument: str, compiled: bool):
        self.lm, self.cache_argument = lm, cache_argument
        graph = torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False) if compiled else (lambda f: f)
        self.prefill, self.step = graph(self._prefill), graph(self._step)
        self.compiled = compiled

    def _prefill(self, embeds, mask, positions, cache_positions, cache):
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         cache_position=cache_positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_argument: cache}).logits
        return logits[:, -1].float()

    def _step(self, tokens, mask, positions, cache_positions, cache):
        logits = self.lm(input_ids=tokens, attention_mask=mask, position_ids=positions,
                         cache_position=cache_positions, use_cache=True, **{self.cache_argument: cache}).logits
        return logits[:, -1].float()

    def _run(self, part, *args):
        if not self.compiled:
            return part(*args)
        torch.compiler.cudagraph_mark_step_begin()
        return part(*args).clone()  # the graph's output buffer is overwritten by its next replay

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache, cache_length: int, *,
                 max_new_tokens: int, min_new_tokens: int = 0, stops: list[int], pad_token_id: int,
                 streamer=None) -> torch.Tensor:
        """New tokens [rows, steps]: each row's answer through its stop token, then `pad_token_id`; as many
        steps as the longest answer needs, as generate() returns them. A `streamer` (one row) gets what
        generate() would give it: the prompt's ids (none: the prompt is embeddings), each token, then end()."""
        rows, length = attention_mask.shape
        device = embeds.device
        mask = torch.zeros(rows, cache_length, dtype=attention_mask.dtype, device=device)
        mask[:, :length] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        if streamer is not None:
            streamer.put(torch.empty(rows, 0, dtype=torch.long))
        logits = self._run(self.prefill, embeds.to(self.lm.dtype), mask, positions, torch.arange(length, device=device),
                           cache)
        position = positions[:, -1:] + 1
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens = []
        for i in range(max_new_tokens):
            if i < min_new_tokens and len(stops):
                logits[:, stop_ids] = -float("inf")
            token = torch.where(done, pad_token_id, logits.argmax(-1))
            tokens.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            done |= torch.isin(token, stop_ids)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            mask[:, length + i] = 1
            logits = self._run(self.step, token[:, None], mask, position + i, torch.tensor([length + i], device=device),
                               cache)
        if streamer is not None:
            streamer.end()
        return torch.stack(tokens, 1)


class DecodingThread:
    """The one thread a model decodes on (VisionLanguageModel.generate). A daemon, which the process leaves
    idling on its queue when it exits, and which ends when this object is collected. A ThreadPoolExecutor's
    worker instead ends at interpreter exit, and its thread-local CUDA-graph state (C++ thread-locals holding
    Python objects) is then released while the interpreter finalizes: the process aborted with "terminate
    called without an active exception" in 17 of 100 exits of a minimal reproduction on a loaded CPU, and
    now and then in the test suite."""

    def __init__(self):
        jobs = self._jobs = queue.SimpleQueue()
        self.thread = threading.Thread(target=_serve, args=(jobs,), name="vlm-decoding", daemon=True)
        self.thread.start()
        weakref.finalize(self, jobs.put, None).atexit = False  # never at exit: see above

    def run(self, function, *args):
        """function(*args) on this thread; its result, or its exception raised here."""
        future: Future = Future()
        self._jobs.put((future, function, args))
        return future.result()


def _serve(jobs: queue.SimpleQueue) -> None:
    cuda_graph_thread_state()
    while (job := jobs.get()) is not None:
        future, function, args = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function(*args))
            except BaseException as e:  # raised again in the caller's thread
                future.set_exception(e)
        del job, future, function, args  # nothing of the last call stays alive while the thread waits


def cuda_graph_thread_state() -> None:
    """Give this thread CUDA-graph trees' per-thread state. torch before 2.14 creates it only on the thread
    that first imports inductor, so CUDA graphs on any other thread failed an assertion there (seen on
    torch 2.11: decoding once training or another compiled model had run on the main thread, and the
    main thread's compiled model once decoding had compiled first)."""
    from torch._inductor import cudagraph_trees

    state = cudagraph_trees.local  # a threading.local: its attributes keep the objects the TLS refers to alive
    if not hasattr(state, "tree_manager_containers") and not torch._C._is_key_in_tls("tree_manager_containers"):
        state.tree_manager_containers = {}
        state.tree_manager_locks = defaultdict(threading.Lock)
        torch._C._stash_obj_in_tls("tree_manager_containers", state.tree_manager_containers)
        torch._C._stash_obj_in_tls("tree_manager_locks", state.tree_manager_locks)
