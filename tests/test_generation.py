"""Static-cache generation (the GPU default, compiled there) gives the eager dynamic-cache path's greedy tokens.

Compilation itself needs CUDA; the static cache, its bucketed shapes, the padding rows and the reuse of a
cache across calls all run here, on the CPU."""

import pytest
import torch

QUESTIONS = ["what shape?", "what is the color of the shape in the image, and is it a circle?", "yes", "no?"]


@pytest.fixture
def model(tiny_model):
    with torch.no_grad():
        tiny_model.projector.proj[2].weight.mul_(20)  # make the image matter to the output
    return tiny_model


def batch(model, images, questions):
    present = [images[i % len(images)] if i % 3 else None for i in range(len(questions))]  # text-only rows too
    return model.prepare(present, [[{"role": "user", "content": q}] for q in questions])


def test_static_cache_gives_the_dynamic_caches_greedy_tokens_with_padding_and_early_stops(model, images):
    inputs = batch(model, images, QUESTIONS[:3])  # 3 rows: the static cache pads them to 4
    assert inputs["attention_mask"].sum(-1).unique().numel() == 3  # three prompt lengths, left-padded
    free = model.generate(**inputs, max_new_tokens=12, decoding="dynamic")
    # A token the first row says early and the others never do, made the stop token: rows end at different steps.
    stop = next(t for t in free[0, 1:6].tolist() if t not in free[1:].flatten().tolist())
    dynamic = model.generate(**inputs, max_new_tokens=12, decoding="dynamic", eos_token_id=stop)
    static = model.generate(**inputs, max_new_tokens=12, decoding="static", eos_token_id=stop)
    pad = model.tokenizer.pad_token_id
    assert (dynamic[0] == pad).any() and not (dynamic[1:] == pad).all()  # the first row stopped early, not all
    assert dynamic.shape == (3, 12)
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_a_reused_cache_leaves_nothing_of_the_last_batch_in_the_next(model, images):
    """The eval pattern: full batches, then a smaller last one, all on the first batch's cache."""
    for questions in (QUESTIONS, QUESTIONS[::-1], QUESTIONS[1:3]):
        inputs = batch(model, images, questions)
        dynamic = model.generate(**inputs, max_new_tokens=6, decoding="dynamic")
        static = model.generate(**inputs, max_new_tokens=6, decoding="static")
        torch.testing.assert_close(static, dynamic, rtol=0, atol=0)
    assert [key[:2] for key in model._caches] == [(4, 256)]  # one shape: one compiled variant on a GPU


def test_greedy_batches_decode_in_vlms_loop_with_min_new_tokens_as_generate_reads_it(model, images, monkeypatch):
    inputs = batch(model, images, QUESTIONS)
    free = model.generate(**inputs, max_new_tokens=6, decoding="dynamic")
    stop = free[0, 0].item()  # the first row would stop at once: min_new_tokens must hold it back
    dynamic = model.generate(**inputs, max_new_tokens=6, min_new_tokens=3, eos_token_id=stop, decoding="dynamic")
    assert (dynamic[0, :3] != stop).all()
    monkeypatch.setattr(model.lm, "generate", None)  # greedy decoding on the static cache never calls generate()
    static = model.generate(**inputs, max_new_tokens=6, min_new_tokens=3, eos_token_id=stop, decoding="static")
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_greedy_decoding_follows_an_lm_replaced_after_the_first_answer(model, images, monkeypatch):
    import copy

    inputs = batch(model, images, QUESTIONS[:2])
    before = model.generate(**inputs, max_new_tokens=4, decoding="static")
    other = copy.deepcopy(model.lm)
    with torch.no_grad():
        other.model.norm.weight.mul_(-1)  # flips every logit: another greedy answer
    monkeypatch.setattr(model, "lm", other)
    dynamic = model.generate(**inputs, max_new_tokens=4, decoding="dynamic")
    assert not torch.equal(dynamic, before)
    torch.testing.assert_close(model.generate(**inputs, max_new_tokens=4, decoding="static"), dynamic, rtol=0, atol=0)


def test_sampling_runs_on_the_static_cache(model, images):
    inputs = batch(model, images, QUESTIONS[:2])
    torch.manual_seed(0)
    dynamic = model.generate(**inputs, max_new_tokens=6, decoding="dynamic", do_sample=True, temperature=0.8)
    torch.manual_seed(0)
    static = model.generate(**inputs, max_new_tokens=6, decoding="static", do_sample=True, temperature=0.8)
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_chat_and_stream_chat_take_the_static_path(model, images):
    questions = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    eager = model.chat(images[:3], questions, max_new_tokens=8, decoding="dynamic")
    assert model.chat(images[:3], questions, max_new_tokens=8, decoding="static") == eager
    # A streamer takes one row, so the stream gets a cache of its own rather than the batch's padded one.
    streamed = "".join(model.stream_chat(images[0], questions[0], max_new_tokens=8, decoding="static"))
    assert streamed.strip() == eager[0]
    assert sorted(key[0] for key in model._caches) == [1, 4]


class RecordingStreamer:
    """What a streamer is handed, call by call: the prompt's ids first, then each token, then end()."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


def test_greedy_streams_from_vlms_loop_what_generate_streams(model, images, monkeypatch):
    inputs = batch(model, images, QUESTIONS[1:2])
    from_generate, from_loop = RecordingStreamer(), RecordingStreamer()
    model.generate(**inputs, max_new_tokens=8, decoding="dynamic", streamer=from_generate)
    monkeypatch.setattr(model.lm, "generate", None)  # the demo's greedy answers never reach generate()
    model.generate(**inputs, max_new_tokens=8, decoding="static", streamer=from_loop)
    assert len(from_generate.calls) > 2 and from_loop.calls == from_generate.calls


def test_left_padding_a_prompt_leaves_greedy_tokens_unchanged(model, images):
    # A compiled prefill pads prompts to a few lengths (prefill_length); the mask must hide the padding.
    import torch.nn.functional as F

    from vlm.decoding import GreedyDecoder, prefill_length
    from vlm.model import _cache_argument

    inputs = batch(model, images, QUESTIONS[:2])
    embeds = model.embed(inputs["input_ids"], model.image_embeddings(inputs["pixel_values"]))
    mask = inputs["attention_mask"]
    pad = prefill_length(mask.shape[1]) - mask.shape[1]
    assert pad > 0
    decoder = GreedyDecoder(model.lm, _cache_argument(), compiled=False)
    settings = {"max_new_tokens": 6, "stops": [], "pad_token_id": model.tokenizer.pad_token_id}
    tokens = [decoder(e, m, model._static_cache(2, 256, pad_rows=False)[0], 256, **settings)
              for e, m in ((embeds, mask), (F.pad(embeds, (0, 0, pad, 0)), F.pad(mask, (pad, 0))))]
    torch.testing.assert_close(tokens[1], tokens[0], rtol=0, atol=0)


def test_the_cpu_default_is_the_dynamic_cache_and_bad_settings_are_named(model, images):
    inputs = batch(model, images, QUESTIONS[:2])
    model.generate(**inputs, max_new_tokens=2)
    assert model._caches == {}
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(**inputs, max_new_tokens=2, decoding="compiled")
    with pytest.raises(ValueError, match="dynamic, static, compiled"):
        model.generate(**inputs, max_new_tokens=2, decoding="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled decoding records CUDA graphs")
def test_compiled_decoding_works_after_the_main_thread_recorded_cuda_graphs(model, images):
    # As after training, or a compiled model of the user's: torch 2.11 then failed on the decoding thread.
    double = torch.compile(lambda x: x * 2, mode="reduce-overhead")
    for _ in range(3):
        double(torch.ones(4, device="cuda"))
    model.to("cuda")
    inputs = batch(model, images, QUESTIONS)
    torch.testing.assert_close(model.generate(**inputs, max_new_tokens=8, decoding="compiled"),
                               model.generate(**inputs, max_new_tokens=8, decoding="dynamic"), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled decoding records CUDA graphs")
def test_compiled_decoding_gives_the_eager_greedy_tokens_on_a_gpu(model, images):
    model.to("cuda")
    for questions in (QUESTIONS, QUESTIONS[1:3]):
        inputs = batch(model, images, questions)
        eager = model.generate(**inputs, max_new_tokens=8, decoding="dynamic")
        torch.testing.assert_close(model.generate(**inputs, max_new_tokens=8, decoding="compiled"), eager,
                                   rtol=0, atol=0)
    # The demo streams from a new thread per answer; decoding stays on the model's one thread and its graphs.
    question = [{"role": "user", "content": QUESTIONS[0]}]
    streamed = [text.strip() for text in ("".join(model.stream_chat(images[0], question, max_new_tokens=8)),
                                          "".join(model.stream_chat(images[0], question, max_new_tokens=8)))]
    assert streamed == model.chat([images[0]], [question], max_new_tokens=8, decoding="dynamic") * 2


def test_the_callers_thread_keeps_cuda_graph_state_when_decoding_imports_inductor_first(checkpoint):
    # torch < 2.14 gives CUDA-graph trees' state only to the thread that first imports inductor. A fresh
    # process whose first static decoding did that on vlm's decoding thread left the main thread without
    # it, and its next reduce-overhead compile (training, a user's model) failed an assertion on a GPU.
    import subprocess
    import sys

    script = f"""
import torch
from vlm.model import VisionLanguageModel
assert not torch._C._is_key_in_tls("tree_manager_containers"), "inductor already imported: the check means nothing"
model = VisionLanguageModel.from_pretrained({str(checkpoint)!r})
model.chat([None], [[{{"role": "user", "content": "hi"}}]], max_new_tokens=2, decoding="static")
print(torch._C._is_key_in_tls("tree_manager_containers"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "True"


def test_decoding_runs_on_one_daemon_thread_that_returns_results_and_raises_errors_in_the_caller(model, images):
    # A non-daemon worker (ThreadPoolExecutor's) ends at interpreter exit and releases its thread-local
    # CUDA-graph state while the interpreter finalizes: now and then the process aborted on exit.
    import gc
    import threading

    from vlm.decoding import DecodingThread

    model.generate(**batch(model, images, QUESTIONS[:1]), max_new_tokens=2, decoding="static")
    first = model._decoder.thread
    model.generate(**batch(model, images, QUESTIONS[:2]), max_new_tokens=2, decoding="static")
    assert model._decoder.thread is first and first.daemon and first.is_alive()
    decoding = DecodingThread()
    assert decoding.run(lambda a, b: (threading.current_thread(), a + b), 2, 3) == (decoding.thread, 5)
    with pytest.raises(ValueError, match="bad"):
        decoding.run(lambda: (_ for _ in ()).throw(ValueError("bad")))
    thread = decoding.thread
    del decoding
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()  # a collected model's thread ends, not leaks


def test_inference_in_bfloat16_rounds_the_lms_weights_and_not_ropes_frequencies(model, images):
    from vlm.model import to_accelerator

    to_accelerator(model, "float32")  # onto the GPU where there is one, weights as they are
    inputs = batch(model, images, QUESTIONS)
    with torch.no_grad():
        reference = model(**inputs).logits
    buffers = {name: buffer.clone() for name, buffer in model.lm.named_buffers() if buffer.is_floating_point()}
    assert any("inv_freq" in name for name in buffers)
    to_accelerator(model, "bfloat16")
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    for name, buffer in model.lm.named_buffers():
        if name in buffers:
            torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)
    with torch.no_grad():
        rounded = model(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    # bfloat16 keeps 8 bits of mantissa: logits move by a few hundredths of their spread, not more
    assert (rounded - reference)[mask].abs().max() < 0.05 * reference[mask].std()
    assert model.generate(**inputs, max_new_tokens=4).shape == (len(QUESTIONS), 4)
