"""Resident memory of the demo before and after many questions, large uploads among them.

    python -m benchmarks.demo_memory                          # the model `vlm demo` serves
    python -m benchmarks.demo_memory --questions 200 --users 20

Serves the app (demo/app.py's build_app) in this process on a free loopback port and asks through
gradio_client, as remote users do: --users sessions in turn, each starting with an upload (every
other one a --large JPEG drawn on the fly, the rest the bundled examples) and asking follow-ups.
RSS is read after --warmup questions (steady state), then every 20 questions, each time after
gc.collect(); a demo whose memory is bounded ends near where it started however many people came.
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from gradio_client import Client, handle_file
from PIL import Image

from benchmarks.common import describe_device, print_table
from vlm.demo.app import EXAMPLES, build_app, limit_malloc_arenas
from vlm.files import EXAMPLES_DIR
from vlm.model import load_model

QUESTIONS = ["What shape is in the image?", "What color is it?", "Is there a circle?", "What is in the picture?"]


def rss_gib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**30


def large_jpeg(path: Path, width: int, height: int, seed: int) -> Path:
    """A photo-sized JPEG: smooth colour fields with grain, so it compresses as photos do (a few MB)."""
    rng = np.random.default_rng(seed)
    fields = Image.fromarray(rng.integers(0, 256, (height // 250, width // 250, 3), dtype=np.uint8))
    pixels = np.asarray(fields.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels += rng.integers(-12, 13, pixels.shape, dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="as for `vlm demo` (default: the trained offline run's, if any)")
    parser.add_argument("--config", help="as for `vlm demo`")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--users", type=int, default=10, help="sessions the questions are spread over")
    parser.add_argument("--warmup", type=int, default=4, help="questions before the steady-state reading")
    parser.add_argument("--large", default="4000x3000", help="size of the large uploads, WxH")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    width, height = map(int, args.large.split("x"))

    limit_malloc_arenas()  # as `vlm demo` does before it loads the model
    announced: list[str] = []
    model = load_model(args.checkpoint, args.config, announce=announced.append).eval()
    app = build_app(model, announced[-1].removeprefix("loading "))
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    print(describe_device("cpu"))
    print(f"{model.config.vision.backend}:{model.config.vision.name} + {model.config.lm.name}; "
          f"{announced[-1].removeprefix('loading ')}")

    with tempfile.TemporaryDirectory() as tmp:
        def ask(client: Client, question: str, image: Path | None) -> None:
            message = {"text": question, "files": [handle_file(str(image))] if image else []}
            client.predict(message, max_new_tokens=args.max_new_tokens, api_name="/chat")

        # One client, a new session per user: the server sees separate users, and this process holds
        # no client-side thread pools or downloaded answers (the chat shows the upload) to blur the figures.
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        for i in range(args.warmup):
            ask(client, QUESTIONS[i % len(QUESTIONS)], EXAMPLES_DIR / EXAMPLES[0][0] if i == 0 else None)
        steady = rss_gib()
        rows = [{"questions": 0, "large uploads": 0, "RSS GiB": steady}]
        per_user = max(1, args.questions // args.users)
        large, start = 0, time.perf_counter()
        for i in range(args.questions):
            user, turn = divmod(i, per_user)
            image = None
            if turn == 0:
                client.reset_session()
                if user % 2 == 0:
                    image = large_jpeg(Path(tmp) / f"photo-{user}.jpg", width, height, seed=user)
                    large += 1
                else:
                    image = EXAMPLES_DIR / EXAMPLES[user % len(EXAMPLES)][0]
            ask(client, QUESTIONS[turn % len(QUESTIONS)], image)
            if (i + 1) % 20 == 0 or i + 1 == args.questions:
                rows.append({"questions": i + 1, "large uploads": large, "RSS GiB": rss_gib()})
        seconds = time.perf_counter() - start
        client.close()
    app.close()

    print(f"{args.questions} questions from {args.users} users in {seconds:.0f} s, {large} of the uploads "
          f"{width}x{height} JPEGs; RSS after gc.collect():\n")
    print_table(rows, list(rows[0]))
    print(f"\nsteady state {steady:.2f} GiB, after {args.questions} questions {rows[-1]['RSS GiB']:.2f} GiB: "
          f"grew {rows[-1]['RSS GiB'] - steady:+.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
