"""`vlm demo`: chat about an image with a trained projector, in one Gradio process."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from pathlib import Path

import gradio as gr
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vlm.config import ConfigError
from vlm.files import EXAMPLES_DIR
from vlm.images import ImageError, load_image
from vlm.model import VisionLanguageModel, check_generation_settings, load_model, to_accelerator
from vlm.processor import PromptError

# Answers generated at once on the one shared model (thread-safe: the same greedy answers as one at
# a time, checked in tests/test_demo.py). On the offline default on 2 CPU cores, 2 at once nearly
# double the total tokens/s and 4 keep 90% of that while each user's text still starts within a
# second (benchmarks/demo_latency.py, numbers in the README). On a GPU they take turns on compiled
# decoding's one thread (VisionLanguageModel.generate).
CONCURRENT_ANSWERS = 4
EXAMPLES = [
    ("shape_0.png", "What shape is in the image?"),
    ("shape_1.png", "What color is the shape?"),
    ("shape_10.png", "Is there a circle in the image?"),
    ("cat.jpg", "What is in the picture?"),
    # Drawn by benchmarks/render_shapes.py, not easy-VQA's program: rotated, other sizes, shades and backgrounds.
    ("drawn_rotated_triangle.png", "What shape is in the image?"),
    ("drawn_gray_circle.png", "What color is the shape?"),
    ("drawn_blue_rectangle.png", "What is the blue shape?"),
]
NO_IMAGE = "Upload an image (or pick an example below), then ask a question about it."
# The longest side of the image a conversation keeps. The towers read 128-336 px; a phone photo kept at
# full size (12-64 MP, 36-192 MB decoded) would stay in memory as long as gradio keeps the session,
# an hour after the browser closes, and for API clients until 10,000 later sessions push it out.
SESSION_IMAGE_SIDE = 1024
M_ARENA_MAX = -8  # glibc's mallopt parameter
DEFAULT_MAX_NEW_TOKENS = 128


def launch(checkpoint: str | None = None, config: str | None = None, *, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False) -> int:
    """Serve the chat app for a checkpoint (default: the trained offline run), or for an untrained preset."""
    limit_malloc_arenas()
    announced: list[str] = []

    def announce(message: str) -> None:
        announced.append(message)
        print(message, file=sys.stderr)

    model = load_model(checkpoint, config, announce=announce)
    to_accelerator(model)
    if model.device.type == "cuda":
        print("compiling decoding for the GPU (a minute, once)", file=sys.stderr)
        model.warm_up(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    app = build_app(model, announced[-1].removeprefix("loading "))
    try:
        app.launch(server_name=host, server_port=port, share=share)
    except OSError as e:
        # gradio's message names its own launch() arguments; the user needs the CLI flag.
        raise ConfigError(f"cannot serve on {host}:{port} ({str(e).split('. ')[0]}); pass a free --port") from None
    return 0


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Let every thread allocate from the same few glibc arenas; call it before the model loads.

    glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps what a
    thread frees in that arena for its next use. The demo answers on gradio's pool of threads, so
    each arena comes to hold a question's peak (a decoded upload, the model's activations): over 40
    questions the offline default's demo grew 0.35 GiB and never gave it back, 0.03 GiB with two
    arenas (benchmarks/demo_memory.py). Arenas, once made, stay: hence before the model loads.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, arenas)


def build_app(model: VisionLanguageModel, checkpoint_label: str) -> gr.Blocks:
    """The chat app for one loaded model; `checkpoint_label` says which projector it carries."""
    config = model.config
    status = (f"**Encoder** `{config.vision.backend}:{config.vision.name}` · **LM** `{config.lm.name}` · "
              f"{checkpoint_label}")

    def respond(message, session, temperature, top_p, max_new_tokens):
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files") or []
        if files:  # a new image starts a new conversation
            upload = Path(files[-1])
            try:
                # Read as bytes so the message names "the upload", not gradio's temporary path.
                image = load_image(upload.read_bytes())
            except ImageError as e:
                yield (
                    [
                        _says("user", f"Uploaded {upload.name}"),
                        _says("assistant", f"Sorry, {e}. Please try another image."),
                    ],
                    None,
                    None,
                )
                return
            image.thumbnail((SESSION_IMAGE_SIDE, SESSION_IMAGE_SIDE))  # only ever shrinks
            session = {"image": image, "upload": str(upload), "messages": []}
        if session is None:
            yield [_says("assistant", NO_IMAGE)], None, None
            return
        chat = _shown(session)
        if not text:
            yield chat, session, None
            return
        messages = session["messages"] + [{"role": "user", "content": text}]
        chat += [_says("user", text), _says("assistant", "")]
        answer = ""
        stop = threading.Event()
        try:
            # gradio holds API calls to the sliders' bounds too, but NaN compares false to both and gets through.
            check_generation_settings(max_new_tokens, temperature, top_p, flag_prefix="")
            for piece in model.stream_chat(session["image"], messages, temperature=temperature, top_p=top_p,
                                           max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                                           stopping_criteria=StoppingCriteriaList([_StopWhen(stop)])):
                answer += piece
                chat[-1]["content"] = answer
                yield chat, session, None
        except (ConfigError, PromptError) as e:
            chat[-1]["content"] = f"Sorry, {e}."
            yield chat, session, None
            return
        finally:
            stop.set()  # a user who left (or pressed New conversation) frees the CPU for the others
        yield chat, {**session, "messages": messages + [{"role": "assistant", "content": answer.strip()}]}, None

    with gr.Blocks(title="vlm demo", analytics_enabled=False) as app:
        gr.Markdown("## vlm: ask about an image")
        gr.Markdown(status, elem_id="status")
        session = gr.State(None)
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat")
        question = gr.MultimodalTextbox(
            placeholder="Attach an image and ask about it; follow-up questions keep the same image",
            file_count="single", sources=["upload"], label="Question", show_label=False, elem_id="question",
        )
        with gr.Row():
            new = gr.Button("New conversation", variant="secondary")
        with gr.Accordion("Generation settings", open=False):
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (when sampling)")
            max_new_tokens = gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens")
        gr.Examples([[{"text": q, "files": [str(EXAMPLES_DIR / name)]}] for name, q in EXAMPLES], inputs=[question])
        # The conversation lives in the session, so API clients need not send the chat history back.
        answering = question.submit(respond, [question, session, temperature, top_p, max_new_tokens],
                                    [chatbot, session, question], api_name="chat")
        # The chat's own trash icon must forget the session too, or the next question revives the old chat.
        gr.on([new.click, chatbot.clear], lambda: ([], None, None), None, [chatbot, session, question],
              cancels=[answering], api_name="new")
    return app.queue(default_concurrency_limit=CONCURRENT_ANSWERS)


def _shown(session: dict) -> list[dict]:
    return [_says("user", {"path": session["upload"]})] + [_says(m["role"], m["content"]) for m in session["messages"]]


def _says(role: str, content) -> dict:
    return {"role": role, "content": content}


class _StopWhen(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
