"""`vlm demo` served on 127.0.0.1 and driven through gradio_client, as a remote user's program would."""

import collections
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml
from bad_images import WHAT_THE_USER_IS_TOLD, broken_images, odd_images
from demo_server import CHECKPOINT_LABEL, free_port
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from vlm.cli import main
from vlm.demo.app import NO_IMAGE
from vlm.files import EXAMPLES_DIR
from vlm.images import load_image

SHAPE, OTHER_SHAPE = EXAMPLES_DIR / "shape_0.png", EXAMPLES_DIR / "shape_10.png"
TOKENS = 12


def connect(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False)


def ask(client, text, image=None, max_new_tokens=TOKENS):
    message = {"text": text, "files": [handle_file(str(image))] if image else []}
    job = client.submit(message, max_new_tokens=max_new_tokens, api_name="/chat")
    chat, _ = job.result(timeout=120)
    return chat, job


def text_of(message) -> str:
    return "".join(part.get("text", "") for part in message["content"])


def words(text: str) -> str:
    """Gradio's chat display turns tabs into spaces; the random model's answers contain some."""
    return " ".join(text.split())


def expected_answer(model, image, turns: list[str], max_new_tokens=TOKENS) -> str:
    """The words of the model's own batched greedy answer for the same conversation."""
    conversation = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return words(model.chat([load_image(image)], [conversation], max_new_tokens=max_new_tokens)[0])


def test_an_answer_about_the_image_is_streamed(demo_url, demo_model):
    chat, job = ask(connect(demo_url), "what shape is in the image?", SHAPE)
    assert [m["role"] for m in chat] == ["user", "user", "assistant"]
    assert chat[0]["content"][0]["type"] == "file"
    answer = text_of(chat[-1])
    assert words(answer) == expected_answer(demo_model, SHAPE, ["what shape is in the image?"])
    partial = {text_of(out[0][-1]) for out in job.outputs() if out[0] and out[0][-1]["role"] == "assistant"}
    partial.discard("")
    assert len(partial) >= 3 and all(answer.startswith(p) for p in partial)


def test_a_follow_up_question_keeps_the_image_and_the_conversation(demo_url, demo_model):
    client = connect(demo_url)
    chat, _ = ask(client, "what shape is in the image?", SHAPE)
    first = demo_model.chat([load_image(SHAPE)], [[{"role": "user", "content": "what shape is in the image?"}]],
                            max_new_tokens=TOKENS)[0]
    assert words(text_of(chat[-1])) == words(first)
    chat, _ = ask(client, "what color is it?")
    assert len(chat) == 5
    assert words(text_of(chat[-1])) == expected_answer(
        demo_model, SHAPE, ["what shape is in the image?", first, "what color is it?"])


def test_a_new_image_or_new_conversation_forgets_the_old_one(demo_url, demo_model):
    client = connect(demo_url)
    chat, _ = ask(client, "what shape is in the image?", SHAPE)
    chat, _ = ask(client, "what shape is in the image?", OTHER_SHAPE)
    assert len(chat) == 3
    assert words(text_of(chat[-1])) == expected_answer(demo_model, OTHER_SHAPE, ["what shape is in the image?"])
    client.predict(api_name="/new")
    chat, _ = ask(client, "and now?")
    assert text_of(chat[-1]) == NO_IMAGE


@pytest.mark.parametrize("name", sorted(WHAT_THE_USER_IS_TOLD))
def test_a_bad_upload_gets_a_friendly_message_and_the_app_keeps_answering(demo_url, demo_model, tmp_path, name):
    client = connect(demo_url)
    chat, _ = ask(client, "what is this?", broken_images(tmp_path)[name])
    reply = text_of(chat[-1])
    assert chat[-1]["role"] == "assistant" and reply.startswith("Sorry, the upload")
    assert WHAT_THE_USER_IS_TOLD[name] in reply and "/tmp" not in reply
    chat, _ = ask(client, "what is this?", SHAPE)
    assert words(text_of(chat[-1])) == expected_answer(demo_model, SHAPE, ["what is this?"])


def test_a_question_past_the_lms_context_gets_a_friendly_message_and_the_app_keeps_answering(demo_url, demo_model):
    client = connect(demo_url)
    chat, _ = ask(client, "circle " * 600, SHAPE)
    reply = text_of(chat[-1])
    assert reply.startswith("Sorry, the prompt is ") and "context of 512 tokens" in reply
    chat, _ = ask(client, "what shape is in the image?")
    assert words(text_of(chat[-1])) == expected_answer(demo_model, SHAPE, ["what shape is in the image?"])


def test_image_placeholders_typed_in_a_question_are_text_and_get_an_answer(demo_url, demo_model):
    question = "<image> and <image>: what shape?"
    chat, _ = ask(connect(demo_url), question, SHAPE)
    assert words(text_of(chat[-1])) == expected_answer(demo_model, SHAPE, [question])


@pytest.mark.parametrize("setting", [{"max_new_tokens": 0}, {"top_p": 2.0}, {"temperature": -1.0}])
def test_generation_settings_out_of_range_are_one_line_and_the_app_keeps_answering(demo_url, demo_model, setting):
    client = connect(demo_url)
    message = {"text": "what shape is in the image?", "files": [handle_file(str(SHAPE))]}
    with pytest.raises(AppError) as refusal:  # the sliders' bounds, which gradio holds API calls to
        client.submit(message, **{"max_new_tokens": TOKENS, **setting}, api_name="/chat").result(timeout=120)
    assert len(str(refusal.value).splitlines()) == 1 and str(next(iter(setting.values()))) in str(refusal.value)
    chat, _ = ask(client, "what shape is in the image?", SHAPE)
    assert words(text_of(chat[-1])) == expected_answer(demo_model, SHAPE, ["what shape is in the image?"])


@pytest.mark.parametrize("name", ["temperature", "top_p", "max_new_tokens"])
def test_a_nan_setting_from_an_api_client_is_refused_by_name(demo_url, name):
    # NaN compares false to both of a slider's bounds, so gradio lets it through; gradio_client cannot send it.
    with open(SHAPE, "rb") as f:
        (path,) = httpx.post(f"{demo_url}gradio_api/upload", files={"files": (SHAPE.name, f, "image/png")}).json()
    message = {"text": "what shape is in the image?", "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]}
    settings = {"temperature": "0", "top_p": "0.9", "max_new_tokens": str(TOKENS), name: "NaN"}
    values = ", ".join(settings[k] for k in ("temperature", "top_p", "max_new_tokens"))
    body = f'{{"data": [{json.dumps(message)}, {values}]}}'
    event = httpx.post(f"{demo_url}gradio_api/call/chat", content=body, headers={"content-type": "application/json"})
    stream = httpx.get(f"{demo_url}gradio_api/call/chat/{event.json()['event_id']}", timeout=120).text
    chat = json.loads(stream.strip().splitlines()[-1].removeprefix("data: "))[0]
    reply = chat[-1]["content"][0]["text"]
    assert reply.startswith(f"Sorry, {name.replace('_', '-')} must be") and reply.endswith("got nan.")


@pytest.mark.parametrize("name", ["cmyk.jpg", "transparent.png", "greyscale.png", "animated.gif"])
def test_odd_but_readable_images_are_answered(demo_url, demo_model, tmp_path, name):
    path = odd_images(tmp_path)[name]
    chat, _ = ask(connect(demo_url), "what is this?", path)
    assert words(text_of(chat[-1])) == expected_answer(demo_model, path, ["what is this?"])


def test_two_users_at_once_both_get_their_own_answers(demo_url, demo_model):
    # Each answer's first two steps wait for the other's, so the two are generated together however
    # fast the machine: a tiny LM's 48 tokens can otherwise be done before the second user's upload
    # has arrived. A server answering one user at a time leaves the first waiting here, and fails.
    together = threading.Barrier(2, timeout=60)
    steps = collections.Counter()

    def step_together(*_):
        steps[threading.get_ident()] += 1
        if steps[threading.get_ident()] <= 2:
            try:
                together.wait()
            except threading.BrokenBarrierError:
                pass  # asserted below, after both answers are in

    hook = demo_model.lm.register_forward_hook(step_together)
    try:
        jobs = [connect(demo_url).submit({"text": "what shape is it?", "files": [handle_file(str(image))]},
                                         max_new_tokens=48, api_name="/chat") for image in (SHAPE, OTHER_SHAPE)]
        answers = [words(text_of(job.result(timeout=120)[0][-1])) for job in jobs]
    finally:
        hook.remove()
    assert not together.broken, "the two answers were generated one after the other, not together"
    assert answers == [expected_answer(demo_model, image, ["what shape is it?"], 48) for image in (SHAPE, OTHER_SHAPE)]


def test_a_user_who_leaves_mid_answer_stops_the_generation(demo_url, demo_model):
    steps = []

    def count_a_slow_step(*_):
        # A tiny LM could otherwise finish all 400 tokens before the cancel lands. gradio_client's cancel waits
        # for the lock its stream reader holds while it takes in each update: at 10 ms a step the reader held
        # it nearly all the time and the cancel went out only once all 400 were done (half the runs of this file).
        steps.append(1)
        time.sleep(0.05)

    hook = demo_model.lm.register_forward_hook(count_a_slow_step)
    try:
        job = connect(demo_url).submit({"text": "what shape is it?", "files": [handle_file(str(SHAPE))]},
                                       max_new_tokens=400, api_name="/chat")  # with the prompt, within 512
        while not any(text_of(out[0][-1]) for out in job.outputs() if out[0] and out[0][-1]["role"] == "assistant"):
            time.sleep(0.05)
        job.cancel()
        time.sleep(1.0)
        stopped_at = len(steps)
        time.sleep(1.0)
    finally:
        hook.remove()
    assert len(steps) == stopped_at < 400


def status_line(client) -> str:
    (line,) = [c["props"]["value"] for c in client.config["components"] if c["props"].get("elem_id") == "status"]
    return line


def test_the_status_line_names_the_encoder_lm_and_checkpoint(demo_url, tiny_model_config):
    line = status_line(connect(demo_url))
    assert tiny_model_config.vision.name in line and tiny_model_config.lm.name in line and CHECKPOINT_LABEL in line


@pytest.fixture
def tiny_preset(tmp_path, tiny_model_config):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision": {"backend": "hf", "name": tiny_model_config.vision.name},
                                              "lm": {"name": tiny_model_config.lm.name}}}))
    return path


def test_vlm_demo_without_a_checkpoint_serves_and_says_how_to_train_one(tiny_preset, tmp_path):
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vlm.cli", "demo", "--config", str(tiny_preset), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "vlm demo did not start serving in 120 s"
                time.sleep(0.5)
        client = connect(url)
        assert "vlm train --config" in status_line(client)
        chat, _ = ask(client, "what shape is in the image?", SHAPE)
        assert chat[-1]["role"] == "assistant" and not text_of(chat[-1]).startswith("Sorry")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_vlm_demo_on_a_taken_port_ends_with_one_clear_line(tiny_preset, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--config", str(tiny_preset), "--port", str(port)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("vlm demo: ") and f":{port}" in last and "--port" in last
