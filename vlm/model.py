"""The combined model: frozen vision encoder -> trainable projector -> frozen causal LM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from threading import Thread
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlm.config import ConfigError, ModelConfig, from_dict, load_config, to_dict
from vlm.decoding import DecodingThread, GreedyDecoder, cuda_graph_thread_state, is_plain_greedy, prefill_length
from vlm.files import atomic_dir
from vlm.language_model import DTYPES, load_language_model
from vlm.precision import bf16_is_fast
from vlm.processor import IGNORE_INDEX, PromptError, VLMProcessor, typed_messages
from vlm.projector import Projector
from vlm.vision import VisionEncoder, build_vision_encoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONFIG_FILE = "vlm_config.json"
PROJECTOR_FILE = "projector.safetensors"
LORA_DIR = "lora"
LM_DIR = "lm"
PAD_MULTIPLE_COMPILED = 64
# How generate() keeps its KV cache; see VisionLanguageModel.generate.
DECODING = ("dynamic", "static", "compiled")
# What the LM computes in for inference; see to_accelerator.
INFERENCE_DTYPES = ("auto", *DTYPES)
# The shortest static cache, in tokens. Caches are sized in powers of two from here, so a whole eval (prompts
# of one benchmark, one answer budget) fits one size, and each size is one compiled decoding step.
MIN_CACHE_LENGTH = 256
# CPU training rows up to this length attend through SDPA's math path (see forward): its saved scores, about 0.5 GiB
# at this length for batch 8 and a 30-layer, 9-head LM in fp32, stay small next to the flash kernel's slow backward.
MATH_ATTENTION_MAX_LENGTH = 256


def compile_blocks(part: nn.Module, mode: str | None = None) -> None:
    """torch.compile every block of each stack of identical blocks in `part` (a tower, a decoder): one
    compiled frame serves them all, so compiling costs one block's trace, not the whole stack's."""
    for stack in block_stacks(part):
        for block in stack:
            block.compile(mode=mode)


def block_stacks(part: nn.Module) -> list[nn.ModuleList]:
    """Each stack of identical blocks in `part`: the layers of a tower, of a decoder."""
    return [stack for stack in part.modules()
            if isinstance(stack, nn.ModuleList) and len({type(block) for block in stack}) == 1]


def decoder_blocks(lm: PreTrainedModel) -> nn.ModuleList:
    """The LM's decoder blocks, bottom first."""
    return max(block_stacks(lm.get_decoder()), key=len)


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionEncoder, lm: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.projector = Projector(config.projector, vision.hidden_size, lm.config.hidden_size, vision.num_patches)
        self.processor = VLMProcessor(tokenizer, vision.preprocess, self.projector.num_tokens,
                                      config.lm.system_prompt)
        self.compiled = False  # set by compile_for_training()
        # Static KV caches by (rows, length, device, dtype), and the one thread that generates with them: a cache
        # holds one generation at a time, and torch keeps the CUDA graphs of compiled decoding per thread, so
        # decoding on each caller's thread (the demo starts one per answer) would record them all again.
        self._caches: dict[tuple, object] = {}
        self._decoder: DecodingThread | None = None
        self._greedy_decoders: dict[bool, GreedyDecoder] = {}  # by compiled or not
        # How packed rows attend (packed_attention_mask): "flex" or "sdpa"; None picks by device.
        self.packed_attention: str | None = None

    @classmethod
    def from_config(cls, config: ModelConfig) -> VisionLanguageModel:
        vision = build_vision_encoder(config.vision)
        lm, tokenizer = load_language_model(config.lm)
        return cls(config, vision, lm, tokenizer)

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()  # a frozen LM keeps inference behaviour (no dropout) while the projector trains
        return self

    def compile_for_training(self) -> None:
        """torch.compile each block of the vision tower and of the LM decoder; decoder blocks run as CUDA graphs.

        Small backbones leave a step bound by Python and kernel launches rather than FLOPs: an eager
        block launches dozens of small elementwise kernels, and even compiled, a 135M decoder's
        forward and backward are 400+ separate matmul launches; CUDA graphs ("reduce-overhead")
        launch each block's work at once. Blocks rather than the whole decoder: traced as one graph,
        the decoder builds an explicit causal mask (transformers cannot skip it while tracing on
        torch < 2.14), and SDPA with a mask ran at half speed on the H100. Per block, eager code
        decides the mask and SDPA keeps its causal kernel; one compile also serves every block, so
        compiling takes seconds, not a minute (docs/benchmarks.md, "How the compiled step got here").
        The vision tower runs without CUDA graphs: HF towers keep every block's output for the
        feature layer, and a replay of the shared block graph overwrites them.

        A graph is recorded per batch shape, so training batches pad their length to a multiple of
        PAD_MULTIPLE_COMPILED; packed batches (VLMProcessor.pack) have one shape. Generation runs these
        blocks eagerly (a dynamic KV cache changes shape at every step, and prefill lengths vary), and after
        this call it does not compile decoding either: see generate(). Call this after adding LoRA.
        """
        # One compiled frame serves the blocks of both towers, with and without grad, before and after
        # LoRA, at several shapes. Past dynamo's default of 8 variants it silently runs the rest eagerly
        # (an easy-VQA run on the H100 hit it).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compile_blocks(self.vision.tower)
        compile_blocks(self.lm.get_decoder(), mode="reduce-overhead")
        self.compiled = True

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # ---- forward ---------------------------------------------------------------------------

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part's output, what the feature cache stores: the tower's features after the
        projector's parameter-free token compression, [num_images, num_image_tokens, features]."""
        return self.projector.compress(self.vision(pixel_values))

    def image_embeddings(self, pixel_values=None, image_features=None) -> torch.Tensor | None:
        """[num_images, num_image_tokens, lm_hidden] from pixels, or from `image_features` (cached);
        None for a text-only batch."""
        if pixel_values is None and image_features is None:
            return None
        if image_features is None:
            image_features = self.image_features(pixel_values)
        return self.projector.project(image_features.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
              images_at: torch.Tensor | None = None) -> torch.Tensor:
        """LM input embeddings with image embeddings written at the placeholder positions, in order;
        `images_at` ([2, n] rows and columns, from VLMProcessor.training_positions) saves finding them."""
        is_image = input_ids == self.processor.image_token_id
        # The placeholder id is new to the LM's vocabulary; look up id 0 there and overwrite it below.
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        # Found on the GPU, the positions come to the host once, here, before any heavy work is queued.
        # masked_scatter would look them up again in its backward pass and stall the GPU mid-step.
        rows, cols = images_at if images_at is not None else is_image.nonzero(as_tuple=True)
        expected = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if len(rows) != expected:
            raise ValueError(
                f"the batch has {len(rows)} image placeholder tokens but {expected} image features; "
                f"each image needs exactly one {self.processor.num_image_tokens}-token placeholder "
                "(encode with the model's processor)"
            )
        if image_embeds is None:
            return embeds
        return embeds.index_put((rows, cols), image_embeds.reshape(expected, -1).to(embeds.dtype))

    def packed_attention_mask(self, position_ids: torch.Tensor):
        """The attention of rows packed with several examples, each starting at position 0 (VLMProcessor.pack):
        causal within an example, never across. With "flex" a flex_attention BlockMask, which skips the
        blocks no query of an example may see; with "sdpa" a [rows, 1, length, length] boolean mask.
        flex is the default on a GPU; on a CPU flex_attention has no backward pass."""
        kind = self.packed_attention or ("flex" if position_ids.device.type == "cuda" else "sdpa")
        sequence = (position_ids == 0).cumsum(-1)
        if kind == "sdpa":
            causal = torch.ones(sequence.shape[-1], sequence.shape[-1], dtype=torch.bool, device=sequence.device).tril()
            return ((sequence[:, :, None] == sequence[:, None, :]) & causal)[:, None]
        from torch.nn.attention.flex_attention import create_block_mask

        def same_example(batch, head, q, kv):
            return (sequence[batch, q] == sequence[batch, kv]) & (q >= kv)

        rows, length = sequence.shape
        return create_block_mask(same_example, rows, None, length, length, device=sequence.device)

    @contextmanager
    def _attention(self, mask):
        """The LM's attention implementation for this mask: flex_attention for a BlockMask. The blocks read
        it at every call (compiled blocks keep a graph for each), so it is set only for this forward."""
        config = self.lm.config
        loaded = config._attn_implementation
        config._attn_implementation = "sdpa" if isinstance(mask, torch.Tensor) else "flex_attention"
        try:
            yield
        finally:
            config._attn_implementation = loaded

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_features=None,
                supervised_at=None, images_at=None, position_ids=None):
        """Without labels: the LM's output with logits everywhere. With labels: {"loss", "num_tokens"}.

        The loss applies the LM head only where a label is supervised. Image and prompt tokens,
        most of a VQA sequence, never meet the vocabulary-sized matrix: the LM head of a small LM
        is a fifth of its FLOPs, and full-sequence fp32 logits dominate activation memory.
        `supervised_at` and `images_at` (VLMProcessor.training_positions, computed where the batch
        was built) spare the step its two waits for the GPU. `position_ids` that restart at 0 mark rows
        packed with several examples (VLMProcessor.pack), which never attend to one another.
        """
        if labels is None:
            embeds = self.embed(input_ids, self.image_embeddings(pixel_values, image_features))
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        # Everything that needs the host to read GPU values happens here, while the GPU queue is
        # short. Selecting supervised positions after the decoder made the host wait for the whole
        # forward before it could queue the backward (4 syncs, 9.5 ms of a 65 ms step on the H100).
        targets = labels[:, 1:]
        if supervised_at is None:
            supervised_at = torch.stack((targets != IGNORE_INDEX).nonzero(as_tuple=True))
        rows, cols = supervised_at
        if attention_mask is not None and is_right_padded(attention_mask):
            # Causal attention never lets a token see the pads after it, so the mask changes nothing the
            # loss reads; without it the decoder runs SDPA's causal kernel, not an explicit mask (faster
            # backward, and compiled code would otherwise materialise the mask).
            attention_mask = None
        image_embeds = self.image_embeddings(pixel_values, image_features)
        embeds = self.embed(input_ids, image_embeds, images_at)
        attention = nullcontext()
        if position_ids is not None:
            if attention_mask is not None:
                raise ValueError("pass position_ids (packed rows) or attention_mask, not both")
            attention_mask = self.packed_attention_mask(position_ids)
            attention = self._attention(attention_mask)
        kernel = nullcontext()
        if embeds.device.type == "cpu" and torch.is_grad_enabled() and embeds.shape[1] <= MATH_ATTENTION_MAX_LENGTH:
            # SDPA's CPU flash kernel has a slow backward for short rows: 5.6 ms a call on the offline preset's
            # 43-token rows, a fifth of its LoRA step with the LM in bf16. As plain matmuls (the math path) that
            # step fell from 870-901 to 724-730 ms, and from 916-940 to 862-924 ms with the LM in fp32 (batch 8,
            # 2 cores). The math path keeps every [rows, heads, length, length] score matrix for the backward,
            # so longer rows keep flash, whose memory grows with the length, not its square.
            kernel = sdpa_kernel(SDPBackend.MATH)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs are done with
        with attention, kernel:
            hidden = self.lm.get_decoder()(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        logits = self.lm.get_output_embeddings()(hidden[rows, cols]).float()
        loss = F.cross_entropy(logits, targets[rows, cols])
        if image_embeds is None and torch.is_grad_enabled():
            # A text-only batch never reaches the projector: with a frozen LM its loss would have no
            # gradient at all, and under DDP the projector's missing gradients stall the next step.
            # A zero-weighted term keeps it in the graph, as LLaVA's empty slice of image features does.
            loss = loss + 0.0 * sum(p.sum() for p in self.projector.parameters())
        return {"loss": loss, "num_tokens": rows.new_full((), rows.numel())}

    # ---- generation ------------------------------------------------------------------------

    def prepare(self, images: list[Image.Image | None], conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs for a batch, on the model's device (see encode_batch)."""
        return {k: v.to(self.device) for k, v in self.encode_batch(images, conversations).items()}

    def encode_batch(
        self, images: list[Image.Image | None], conversations: list[list[dict]]
    ) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs on the CPU, so a DataLoader worker can build them; a conversation
        without an image is text only. Message contents are what people typed: text, never image slots
        or control tokens."""
        encoded = [self._encode_prompt(image, messages) for image, messages in zip(images, conversations, strict=True)]
        batch = self.processor.pad(encoded, padding_side="left")
        batch.pop("labels")
        present = [image for image in images if image is not None]
        if present:
            batch["pixel_values"] = self.processor.image_transform(present)
        return batch

    def _encode_prompt(self, image: Image.Image | None, messages: list[dict]):
        return self.processor.encode(typed_messages(messages, with_image=image is not None), add_generation_prompt=True)

    def check_prompt_fits(self, image: Image.Image | None, messages: list[dict], max_new_tokens: int) -> None:
        """PromptError unless this conversation's prompt and its answer fit the LM's context, so a
        caller can set one conversation aside before it fails a batch."""
        self._check_context(len(self._encode_prompt(image, messages).input_ids), max_new_tokens)

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        # Past its trained positions an LM answers garbage, or fails outright where positions are learned.
        limit = self.lm.config.max_position_embeddings
        if prompt_tokens + max_new_tokens > limit:
            raise PromptError(
                f"the prompt is {prompt_tokens} tokens, and with up to {max_new_tokens} new tokens for the answer "
                f"it exceeds the LM's context of {limit} tokens; shorten the question or the conversation, "
                "or ask for fewer new tokens"
            )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, image_features=None, decoding: str | None = None,
                 **generate_kwargs):
        """New token ids only. Greedy by default; pass do_sample/temperature/top_p to sample.

        `decoding` says how the KV cache is kept (the same greedy tokens every way, tests/test_generation.py):
        "dynamic" grows it by a token each step, eagerly: the default on a CPU, where compiling gains nothing.
        "static" preallocates it at a bucketed shape (rows and length rounded up to powers of two) and
        reuses it across calls. "compiled" is static with each decoding step a CUDA graph: the default on a
        GPU, where a small LM's eager step is bound by kernel launches. Greedy answers, batched or streamed,
        decode in vlm's own loop (vlm/decoding.py: 4.4x eager generation alone at batch 64 on an H100, the
        demo's first token in 16-21 ms); sampling goes through transformers' generate(), which compiles its
        step for a static cache. Compiling costs seconds per shape, which a few thousand questions do not win
        back, so `vlm eval` asks for "dynamic" (docs/benchmarks.md, run 8). Prefill runs on the whole batch at
        once: eagerly, or for compiled greedy decoding as a CUDA graph at the prompt length padded up to a power
        of two (left padding, which the attention mask hides), so it compiles once per such length.
        A model compiled for training decodes "static" by default: the stance that keeps its training-
        compiled blocks eager would keep the decoding step eager too.
        """
        decoding = self.resolve_decoding(decoding)
        generate_kwargs.setdefault("max_new_tokens", 64)
        self._check_context(int(attention_mask.sum(-1).max()), generate_kwargs["max_new_tokens"])
        with torch.compiler.set_stance("force_eager"):  # blocks compiled for training: see compile_for_training()
            embeds = self.embed(input_ids, self.image_embeddings(pixel_values, image_features))
        generate_kwargs.setdefault("do_sample", False)
        if not generate_kwargs["do_sample"]:
            generate_kwargs.update(temperature=None, top_p=None, top_k=None)
        generate_kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if decoding == "dynamic":
            with torch.compiler.set_stance("force_eager"):
                return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        if self._decoder is None:
            # This thread too: should the decoding thread import inductor first, this one (training, a user's
            # own compiled model) would lack the state (the GPU test after CPU ones failed so on torch 2.11).
            cuda_graph_thread_state()
            self._decoder = DecodingThread()
        return self._decoder.run(self._generate_static, embeds, attention_mask, decoding == "compiled", generate_kwargs)

    def resolve_decoding(self, decoding: str | None) -> str:
        on_gpu = self.device.type == "cuda"
        if decoding is None:
            return ("static" if self.compiled else "compiled") if on_gpu else "dynamic"
        if decoding not in DECODING:
            raise ValueError(f"decoding must be one of {', '.join(DECODING)}, got {decoding!r}")
        if decoding == "compiled" and not on_gpu:
            raise ValueError("compiled decoding records CUDA graphs and needs the model on a CUDA device; "
                             "use decoding='static' or 'dynamic' on a CPU")
        if decoding == "compiled" and self.compiled:
            raise ValueError("this model's blocks are compiled for training, which keeps decoding eager; "
                             "use decoding='static' (the default for it) or load the model afresh to evaluate")
        return decoding

    @torch.no_grad()
    def _generate_static(self, embeds: torch.Tensor, attention_mask: torch.Tensor, compiled: bool,
                         generate_kwargs: dict) -> torch.Tensor:
        """Greedy batches through vlm's own loop (vlm/decoding.py), the rest through generate(), on a reused
        static cache, on the decoding thread."""
        from transformers import CompileConfig

        rows = embeds.shape[0]
        if compiled:
            # One compiled variant per shape; past dynamo's default limit of 8 the rest would run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        greedy = is_plain_greedy(generate_kwargs, self.lm.generation_config)
        if greedy and compiled:  # the prefill is a CUDA graph too: prompts padded to one of a few lengths
            pad = prefill_length(attention_mask.shape[1]) - attention_mask.shape[1]
            embeds = F.pad(embeds, (0, 0, pad, 0))
            attention_mask = F.pad(attention_mask, (pad, 0))
        # transformers' streamers take one row, so a streamed answer gets a cache without padding rows.
        cache, (cache_rows, cache_length) = self._static_cache(
            rows, attention_mask.shape[1] + generate_kwargs["max_new_tokens"],
            pad_rows=generate_kwargs.get("streamer") is None)
        # The cache's extra rows repeat the first row: they stop when it does, so they never hold the batch back.
        fill = torch.zeros(cache_rows - rows, dtype=torch.long, device=embeds.device)
        embeds, attention_mask = torch.cat((embeds, embeds[fill])), torch.cat((attention_mask, attention_mask[fill]))
        stance = "default" if compiled else "force_eager"  # compiled decoding needs the stance generate() lacks
        with torch.compiler.set_stance(stance):
            if greedy:
                stops = generate_kwargs.get("eos_token_id", self.lm.generation_config.eos_token_id)
                tokens = self._greedy_decoder(compiled)(
                    embeds, attention_mask, cache, cache_length, max_new_tokens=generate_kwargs["max_new_tokens"],
                    min_new_tokens=generate_kwargs.get("min_new_tokens") or 0,
                    stops=[] if stops is None else [stops] if isinstance(stops, int) else list(stops),
                    pad_token_id=generate_kwargs["pad_token_id"], streamer=generate_kwargs.get("streamer"))
            else:
                # generate() compiles its decoding step for a static cache: a CUDA graph per shape, never symbolic.
                options = {"compile_config": CompileConfig(dynamic=False)} if compiled else {"disable_compile": True}
                tokens = self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                          **{_cache_argument(): cache}, **options, **generate_kwargs)
        return tokens[:rows]

    def _greedy_decoder(self, compiled: bool) -> GreedyDecoder:
        decoder = self._greedy_decoders.get(compiled)
        if decoder is None or decoder.lm is not self.lm:  # a new LM (LoRA wrapped, weights reloaded) decodes afresh
            decoder = self._greedy_decoders[compiled] = GreedyDecoder(self.lm, _cache_argument(), compiled)
        return decoder

    def _static_cache(self, rows: int, length: int, pad_rows: bool):
        """The smallest cache held that fits `rows` x `length` (reset), else a new one of bucketed size;
        with its (rows, length). A smaller batch (an eval's last) reuses a larger cache, unless not
        `pad_rows`: padding rows costs less than a new shape, which compiles and records another graph."""
        from transformers import StaticCache

        where = (self.device, self.lm.dtype)
        fits = [key for key in self._caches
                if key[2:] == where and (key[0] >= rows if pad_rows else key[0] == rows) and key[1] >= length]
        if fits:
            key = min(fits)
        else:
            key = (_power_of_two(rows) if pad_rows else rows, min(_power_of_two(max(length, MIN_CACHE_LENGTH)),
                                            max(length, self.lm.config.max_position_embeddings)), *where)
            cache = StaticCache(config=self.lm.config, max_cache_len=key[1])
            # Allocated here, eagerly: left to its first update inside a CUDA graph, the cache would live in
            # the graph's memory pool and be overwritten by the graph's next replay.
            config = self.lm.config
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            cache.early_initialization(key[0], heads, head_dim, self.lm.dtype, self.device)
            self._caches[key] = cache
        cache = self._caches[key]
        cache.reset()
        return cache, key[:2]

    def warm_up(self, max_new_tokens: int = 128) -> None:
        """One throwaway answer at the demo's shape, so compiled decoding compiles and records its graph
        now rather than on the first user's question."""
        image = Image.new("RGB", (self.vision.image_size, self.vision.image_size))
        for _ in self.stream_chat(image, [{"role": "user", "content": "What is in the image?"}],
                                  max_new_tokens=max_new_tokens):  # streamed and greedy, as the demo answers
            pass

    def chat(self, images: list[Image.Image | None], conversations: list[list[dict]], **generate_kwargs) -> list[str]:
        """Batched answers, one per conversation (each ends with a user turn)."""
        return self.answer(self.encode_batch(images, conversations), **generate_kwargs)

    def answer(self, batch: dict[str, torch.Tensor], **generate_kwargs) -> list[str]:
        """Answers for a batch from encode_batch; pinned CPU tensors copy while the GPU still works."""
        tokens = self.generate(**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, **generate_kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def stream_chat(self, image: Image.Image | None, messages: list[dict], **generate_kwargs) -> Iterator[str]:
        """Yields pieces of the answer as they are generated."""
        from transformers import TextIteratorStreamer

        batch = self.prepare([image], [messages])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []

        def run():
            try:
                self.generate(**batch, streamer=streamer, **generate_kwargs)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    # ---- checkpoints -----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Only the projector (safetensors) and a config naming both backbones; written atomically."""
        meta = {
            "model": to_dict(self.config),
            "vision_identity": self.vision.identity,
            "vision_dim": self.vision.hidden_size,
            "lm_dim": self.lm.config.hidden_size,
        }
        with atomic_dir(directory) as staging:
            state = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
            save_file(state, staging / PROJECTOR_FILE)
            # An LM trained in stage 2 travels with the projector: LoRA as a peft adapter, a full LM as a folder.
            meta["lm_weights"] = self.lm_training_mode()
            if meta["lm_weights"] == "lora":
                self.lm.save_pretrained(staging / LORA_DIR)
            elif meta["lm_weights"] == "full":
                self.lm.save_pretrained(staging / LM_DIR)
                self.tokenizer.save_pretrained(staging / LM_DIR)
            (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    def lm_training_mode(self) -> str:
        if hasattr(self.lm, "peft_config"):
            return "lora"
        return "full" if any(p.requires_grad for p in self.lm.parameters()) else "none"

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: ModelConfig | None = None) -> VisionLanguageModel:
        """Load a checkpoint on its own backbones, or on `config`'s, which must be the same ones."""
        saved = read_checkpoint_config(directory)
        if config is not None:
            check_same_backbones(saved, config, directory)
        directory = Path(directory)
        if (directory / LM_DIR).is_dir():
            saved.lm.name = str(directory / LM_DIR)
        model = cls.from_config(saved)
        model.load_projector(directory)
        if (directory / LORA_DIR).is_dir():
            from peft import PeftModel

            model.lm = PeftModel.from_pretrained(model.lm, directory / LORA_DIR)
        return model

    def load_trained_weights(self, directory: str | Path) -> None:
        """Projector, plus LoRA or LM weights where the checkpoint has them, into this model (resume)."""
        self.load_projector(directory)
        directory = Path(directory)
        if (directory / LORA_DIR).is_dir():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.lm, load_file(directory / LORA_DIR / "adapter_model.safetensors"))
        elif (directory / LM_DIR).is_dir():
            state = {}
            for shard in sorted((directory / LM_DIR).glob("*.safetensors")):
                state.update(load_file(shard))
            self.lm.load_state_dict(state, strict=False)  # tied output embeddings are not stored twice

    def load_projector(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        if meta["vision_identity"] != self.vision.identity or meta["lm_dim"] != self.lm.config.hidden_size:
            raise ConfigError(
                f"checkpoint {directory} was trained on vision {meta['vision_identity']} + LM "
                f"{meta['model']['lm']['name']}, but this model has vision {self.vision.identity} + LM "
                f"{self.config.lm.name}; load it onto the backbones it was trained with"
            )
        self.projector.load_state_dict(load_file(directory / PROJECTOR_FILE))


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cache_argument() -> str:
    """The keyword generate() takes a Cache under: transformers renamed past_key_values to cache in 5.x."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def check_generation_settings(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, *,
                              flag_prefix: str = "--") -> None:
    """ConfigError naming the first setting out of range; `vlm chat`, the demo and `vlm eval` all ask here.

    transformers would fail on some of these deep in generation and quietly accept others. The
    comparisons are written so that NaN fails them too.
    """
    if not max_new_tokens >= 1:
        raise ConfigError(f"{flag_prefix}max-new-tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"{flag_prefix}temperature must be at least 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{flag_prefix}top-p must be in (0, 1], got {top_p}")


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros: the padding `VLMProcessor.pad` makes for training."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def read_checkpoint_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} is not a vlm checkpoint (no {CONFIG_FILE}); pass the folder `vlm train` wrote")
    return from_dict(ModelConfig, json.loads(path.read_text())["model"])


def check_same_backbones(saved: ModelConfig, requested: ModelConfig, directory) -> None:
    if (saved.vision, saved.lm.name) != (requested.vision, requested.lm.name):
        raise ConfigError(
            f"checkpoint {directory} was trained on vision {saved.vision.backend}:{saved.vision.name} "
            f"+ LM {saved.lm.name}, but the config asks for vision {requested.vision.backend}:"
            f"{requested.vision.name} + LM {requested.lm.name}; "
            "drop the config to use the checkpoint's backbones, or train a projector for these"
        )


def check_inference_dtype(dtype: str, *, flag_prefix: str = "--") -> None:
    """ConfigError naming the choices; `vlm eval` asks before any data or weights load, to_accelerator again."""
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"{flag_prefix}dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")


def to_accelerator(model: VisionLanguageModel, dtype: str = "auto") -> None:
    """Onto the GPU where there is one, for inference; `vlm eval`, chat and the demo all ask here.

    `dtype` is what the LM's weights compute in: "auto" is bfloat16 on a GPU that has it (what the GPU
    presets train in under mixed precision; a 135M LM decodes about twice as fast as in float32) and
    the weights as loaded on a CPU (the checkpoint's `model.lm.dtype`: the offline preset's `vlm eval`
    took 46 s in bf16 against 72 s in float32 on a 2-core CPU with bf16 instructions, 96.7% both), except
    bf16 or fp16 weights on a CPU without bf16 instructions, which compute there many times slower than
    float32 (vlm/precision.py)."""
    check_inference_dtype(dtype, flag_prefix="")
    cuda = torch.cuda.is_available()
    if cuda:
        model.to("cuda")
    if dtype == "auto":
        if cuda:
            dtype = "bfloat16" if bf16_is_fast("cuda") else None
        else:
            dtype = None if model.lm.dtype == torch.float32 or bf16_is_fast("cpu") else "float32"
    if dtype:
        cast_lm_weights(model.lm, DTYPES[dtype])
    model.eval()


@torch.no_grad()
def cast_lm_weights(lm: nn.Module, dtype: torch.dtype) -> None:
    """The LM's parameters in `dtype`, its buffers as they are: `Module.to(dtype)` would also round RoPE's
    inverse frequencies, turning every position by a different angle than training did."""
    for parameter in lm.parameters():
        parameter.data = parameter.data.to(dtype)


def default_checkpoint() -> Path:
    """Where `vlm train --config offline` leaves its model: what chat, eval and the demo load by default."""
    return Path(load_config("offline").train.output_dir) / "final"


def load_model(
    checkpoint: str | Path | None = None, config: str | None = None, *, announce=print
) -> VisionLanguageModel:
    """The model to chat with: a checkpoint, else the trained offline default, else an untrained preset."""
    requested = load_config(config).model if config else None
    if checkpoint is None and config is None and default_checkpoint().is_dir():
        checkpoint = default_checkpoint()
    if checkpoint:
        if not Path(checkpoint).is_dir():
            raise ConfigError(f"checkpoint folder {checkpoint} does not exist")
        announce(f"loading checkpoint {checkpoint}")
        return VisionLanguageModel.from_pretrained(checkpoint, requested)
    announce(
        "no trained checkpoint: the projector is untrained, so answers ignore the image. "
        "Train one with `vlm train --config offline` (or pass --checkpoint DIR)."
    )
    return VisionLanguageModel.from_config(requested or load_config("offline").model)
