import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vlm.cli import main
from vlm.config import ConfigError
from vlm.model import PROJECTOR_FILE, VisionLanguageModel
from vlm.train.trainer import run_training

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory):
    """A LLaVA-format dataset: 558k-style caption records and 665k-style multi-turn records."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    captions, conversations = [], []
    for i in range(24):
        color = list(COLORS)[i % 3]
        Image.new("RGB", (40, 40), COLORS[color]).save(root / "images" / f"{i}.png")
        captions.append(
            {
                "id": str(i),
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"A {color} square."},
                ],
            }
        )
        conversations.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "What color is it?\n<image>"}, {"from": "gpt", "value": color},
            {"from": "human", "value": "Is it a square?"}, {"from": "gpt", "value": "yes"}]})
    conversations.append(
        {"id": "missing", "image": "images/none.png", "conversations": conversations[0]["conversations"]}
    )
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(conversations))
    return root


def write_config(tmp_path, tiny_model_config, llava_data, **train_overrides) -> str:
    stage = {"epochs": 3, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0}
    config = {
        "model": {
            "vision": {"backend": "hf", "name": tiny_model_config.vision.name},
            "lm": {"name": tiny_model_config.lm.name},
        },
        "data": {
            "align": {"kind": "llava", "path": str(llava_data / "captions.json"), "image_root": str(llava_data)},
            "instruct": {"kind": "llava", "path": str(llava_data / "instruct.json"), "image_root": str(llava_data)},
            "val_fraction": 0.1,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "log_every": 1,
            "eval_every": 5,
            "save_every": 4,
            "align": dict(stage),
            "instruct": dict(stage),
            **train_overrides,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_stage_run_writes_a_loadable_checkpoint_and_its_records(tmp_path, tiny_model_config, llava_data):
    config = write_config(tmp_path, tiny_model_config, llava_data)
    assert run_training(config, []) == 0
    run = tmp_path / "run"
    model = VisionLanguageModel.from_pretrained(run / "final")
    assert model.config.vision.name == tiny_model_config.vision.name
    metrics = rows(run)
    for stage in ("align", "instruct"):
        val = [r["val_loss"] for r in metrics if r["stage"] == stage and "val_loss" in r]
        assert len(val) >= 3 and val[-1] < val[0]  # held-out loss: untrained baseline first, final last
        assert len([r for r in metrics if r["stage"] == stage and "loss" in r]) >= 5
    report = json.loads((run / "report.json").read_text())
    assert report["samples"] > 0 and report["energy_kwh"] > 0 and report["assumptions"]["pue"] == 1.2
    assert report["stages"]["instruct"]["skipped"] == {"missing or unreadable image": 1}
    assert (run / "loss.png").stat().st_size > 1000
    assert list(run.glob("tensorboard/**/events.out.tfevents.*"))
    # A finished run refuses to be overwritten by accident.
    with pytest.raises(ConfigError, match="--resume"):
        run_training(config, [])


def test_the_report_keeps_the_energy_of_a_run_of_a_fraction_of_a_second(tmp_path):
    from types import SimpleNamespace

    from vlm.config import TrainConfig
    from vlm.train.report import write_report

    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    stages = {"align": {"steps": 2, "samples": 16, "seconds": 0.05}}
    write_report(tmp_path, stages, TrainConfig(), accelerator)
    report = json.loads((tmp_path / "report.json").read_text())
    kwh = 65 * 0.05 / 3600 * 1.2 / 1000  # the CPU's default 65 W and PUE 1.2, over 0.05 s
    assert report["energy_kwh"] == pytest.approx(kwh, rel=0.01)
    assert report["co2_g"] == pytest.approx(kwh * 400, rel=0.01)


def test_lora_stage_saves_and_reloads_the_adapter(tmp_path, tiny_model_config, llava_data, images):
    config = write_config(tmp_path, tiny_model_config, llava_data, stage="instruct")
    assert run_training(config, ["train.instruct.train_lm=lora", "train.instruct.epochs=1"]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "lora" / "adapter_model.safetensors").is_file()
    adapter = load_file(final / "lora" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # LoRA B starts at zero
    model = VisionLanguageModel.from_pretrained(final)
    assert model.lm_training_mode() == "lora"


def test_lora_on_the_top_block_with_the_projector_frozen_trains_only_that_block(
    tmp_path, tiny_model_config, llava_data
):
    config = write_config(tmp_path, tiny_model_config, llava_data, keep_last=100)
    stage2 = ["train.instruct.train_lm=lora", "train.instruct.lora_layers=1", "train.instruct.train_projector=false"]
    assert run_training(config, stage2) == 0
    run = tmp_path / "run"
    adapter = load_file(run / "final" / "lora" / "adapter_model.safetensors")
    adapted = {int(re.search(r"\.layers\.(\d+)\.", key)[1]) for key in adapter}
    assert adapted == {1}  # the tiny LM's top block of 2
    assert {key.split(".lora_")[0].rsplit(".", 1)[1] for key in adapter} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    reloaded = VisionLanguageModel.from_pretrained(run / "final")
    assert {re.search(r"\.layers\.(\d+)\.", name)[1] for name, _ in reloaded.lm.named_modules()
            if name.endswith("lora_A")} == {"1"}
    align_end = [c for c in (run / "checkpoints").iterdir() if c.name.startswith("align") and "done" in c.name]
    projector = load_file(run / "final" / PROJECTOR_FILE)
    aligned = load_file(align_end[0] / "model" / PROJECTOR_FILE)
    assert projector.keys() == aligned.keys()
    for key in projector:
        torch.testing.assert_close(projector[key], aligned[key], rtol=0, atol=0)


def test_lora_layers_beyond_the_decoder_name_the_limit(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from vlm.train.trainer import lora_targets

    with pytest.raises(ConfigError, match="the LM has 2 decoder blocks; set it to at most 2"):
        lora_targets(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), 3)


def test_compiled_run_learns_what_the_eager_run_learns(tmp_path, tiny_model_config, llava_data, monkeypatch):
    # Compiled blocks must never fall back to eager silently (dynamo's recompile limit) or change the numbers.
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    val_losses = []
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        out.mkdir()
        config = write_config(out, tiny_model_config, llava_data, compile=compiled)
        assert run_training(config, ["train.instruct.train_lm=lora"]) == 0
        val_losses.append([r["val_loss"] for r in rows(out / "run") if "val_loss" in r])
    eager, compiled = val_losses
    assert len(eager) >= 6 and eager[-1] < eager[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("train.align.lr=fast", "train.align.lr must be float"),
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("data.align.path=/no/such.json", "data.align.path"),
    ("data.instruct.image_root=/no/such/dir", "data.instruct.image_root"),
    ("train.instruct.train_lm=half", "train.instruct.train_lm"),
    ("train.instruct.packing=always", "train.instruct.packing='always' is not an option"),
    ("train.instruct.pack_length=100", "train.instruct.pack_length=100 is shorter than data.max_length=256"),
    ("train.instruct.train_projector=false", "train.instruct would train nothing"),
    ("train.align.lora_layers=2", "train.align.lora_layers=2: it counts the top decoder blocks"),
])
def test_bad_config_stops_before_any_model_loads(
    tmp_path, tiny_model_config, llava_data, monkeypatch, override, message
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(VisionLanguageModel, "from_config", no_model)
    with pytest.raises(ConfigError, match=message):
        run_training(write_config(tmp_path, tiny_model_config, llava_data), [override])


def _train_command(config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlm.cli", "train", "--config", config, *extra]


def _stages_logged(run: Path, after: int) -> list[tuple[str, int]]:
    """(stage, step) of the whole metrics lines past the first `after`; a killed writer may leave half a line."""
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [(row["stage"], row["step"]) for row in map(json.loads, lines[after:])]


def test_a_run_killed_at_random_points_resumes_to_the_same_weights(tmp_path, tiny_model_config, llava_data):
    # Fault injection: SIGKILL while the process starts, then at a seeded random step of align and of
    # instruct (plus a random fraction of a step, so kills also land inside checkpoint writes), each
    # time followed by --resume; the first resume finds no checkpoint and starts over.
    env = {**os.environ, "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}
    args = ["train.align.epochs=3", "train.instruct.epochs=3", "train.save_every=2", "train.eval_every=1000"]
    configs = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        configs[name] = write_config(tmp_path / name, tiny_model_config, llava_data)
    subprocess.run(_train_command(configs["straight"], *args), check=True, env=env, capture_output=True)

    run, rng = tmp_path / "killed" / "run", random.Random(0)
    # Kill within the first half of a stage: a later kill can lose the race to a fast machine finishing the run.
    steps = {stage: max(n for s, n in _stages_logged(tmp_path / "straight" / "run", 0) if s == stage)
             for stage in ("align", "instruct")}
    for stage in (None, "align", "instruct"):
        logged = len(_stages_logged(run, 0))
        process = subprocess.Popen(_train_command(configs["killed"], "--resume", *args), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if stage is None:
            time.sleep(rng.uniform(0, 2))
        else:
            step, deadline = rng.randint(1, max(1, steps[stage] // 2)), time.time() + 300
            while not any(s == stage and n >= step for s, n in _stages_logged(run, logged)):
                assert process.poll() is None and time.time() < deadline, "the run ended before its kill"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))  # a fraction of a tiny step: some kills land in checkpoint writes
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        assert not (run / "final").exists()
    subprocess.run(_train_command(configs["killed"], "--resume", *args), check=True, env=env, capture_output=True)

    straight = load_file(tmp_path / "straight" / "run" / "final" / "projector.safetensors")
    killed = load_file(run / "final" / "projector.safetensors")
    assert straight.keys() == killed.keys() and all(torch.equal(straight[k], killed[k]) for k in straight)
    assert not list((run / "checkpoints").glob(".*"))  # the half checkpoints of killed writers are gone


def test_a_half_written_checkpoint_is_never_resumed_from_and_the_next_save_clears_it(tmp_path):
    from vlm.train.checkpoint import Progress, list_checkpoints, save_checkpoint

    class Model:
        def save_pretrained(self, directory):
            Path(directory).mkdir()

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    killed = tmp_path / "checkpoints" / ".align-step-0000004-x1y2z3"  # killed after its last file, before the rename
    killed.mkdir(parents=True)
    (killed / "progress.json").write_text(json.dumps({"stage": "align", "step": 4}))
    assert list_checkpoints(tmp_path) == []
    saved = save_checkpoint(tmp_path, Model(), optimizer, scheduler, Progress("align", step=2), keep_last=2)
    assert list_checkpoints(tmp_path) == [saved] and not killed.exists()


def test_accelerate_launch_with_two_cpu_processes(tmp_path, tiny_model_config, llava_data):
    config = write_config(tmp_path, tiny_model_config, llava_data)
    # accelerate's multi-process launcher; ACCELERATE_USE_CPU makes the processes join over gloo on CPUs.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "vlm.cli",
            "train",
            "--config",
            config,
            "train.align.epochs=1",
            "train.instruct.epochs=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["processes"] == 2
    VisionLanguageModel.from_pretrained(tmp_path / "run" / "final")


def test_instruct_after_align_in_the_same_folder_starts_from_aligns_weights(tmp_path, tiny_model_config, llava_data):
    # Both stages on the same records, so stage 2's untrained baseline is align's last held-out loss
    # exactly when it starts from align's final projector.
    config = write_config(tmp_path, tiny_model_config, llava_data, align={"epochs": 2, "batch_size": 4, "lr": 3e-3})
    same_data = [f"data.instruct.path={llava_data / 'captions.json'}", "train.instruct.epochs=1"]
    assert run_training(config, same_data, stage="align") == 0
    aligned = load_file(tmp_path / "run" / "final" / "projector.safetensors")
    assert run_training(config, same_data, stage="instruct") == 0
    val = {stage: [r for r in rows(tmp_path / "run") if r["stage"] == stage and "val_loss" in r]
           for stage in ("align", "instruct")}
    assert val["instruct"][0]["step"] == 0 and val["align"][-1]["step"] > 0
    assert val["instruct"][0]["val_loss"] == pytest.approx(val["align"][-1]["val_loss"], rel=1e-6)
    assert val["align"][0]["val_loss"] != pytest.approx(val["align"][-1]["val_loss"], rel=1e-3)  # align trained
    trained = load_file(tmp_path / "run" / "final" / "projector.safetensors")
    assert any(not torch.equal(aligned[k], trained[k]) for k in aligned)
    for stage in ("instruct", "both"):  # stage 2 is done too now: a new run there needs --resume or a new folder
        with pytest.raises(ConfigError, match="already holds a run's checkpoints"):
            run_training(config, same_data, stage=stage)


def test_resume_continues_the_stage_that_was_running_whatever_stage_says(tmp_path, tiny_model_config, llava_data,
                                                                          monkeypatch):
    import vlm.train.trainer as trainer

    save_checkpoint = trainer.save_checkpoint
    finals = {}
    for killed_in, resumed_as in (("align", "instruct"), ("instruct", "align")):
        folder = tmp_path / killed_in
        folder.mkdir()
        config = write_config(folder, tiny_model_config, llava_data)

        def save_then_die(output_dir, model, optimizer, scheduler, progress, keep_last, killed_in=killed_in):
            save_checkpoint(output_dir, model, optimizer, scheduler, progress, keep_last)
            if progress.stage == killed_in:
                raise KeyboardInterrupt  # the process stops right after its first checkpoint in that stage

        monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_training(config, [])
        monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
        with pytest.raises(ConfigError, match="already holds a run's checkpoints; pass --resume"):
            run_training(config, [], stage=resumed_as)  # an unfinished run is continued only when asked
        before = rows(folder / "run")
        assert run_training(config, [], stage=resumed_as, resume=True) == 0
        after = rows(folder / "run")
        last_step = {r["stage"]: r["step"] for r in after}
        if killed_in == "align":  # align finished first, then the instruct stage that --stage asked for
            assert last_step["align"] > before[-1]["step"] and "instruct" in last_step
        else:  # instruct finished; --stage align did not start the run over
            assert last_step["instruct"] > before[-1]["step"]
            assert [r for r in after if r["stage"] == "align"] == [r for r in before if r["stage"] == "align"]
        finals[killed_in] = load_file(folder / "run" / "final" / "projector.safetensors")
    # Two interruptions, one in each stage: both runs end where one uninterrupted run would.
    for key in finals["align"]:
        torch.testing.assert_close(finals["align"][key], finals["instruct"][key], rtol=1e-5, atol=1e-6)


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_a_run_folder_that_cannot_be_written_is_one_line_before_any_model_loads(
    tmp_path, tiny_model_config, llava_data, monkeypatch, capsys
):
    config = write_config(tmp_path, tiny_model_config, llava_data)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        # chmod stops no write by root, who runs these tests in CI: the folder refuses as a read-only mount would.
        if run in (Path(path), Path(path).parent) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(VisionLanguageModel, "from_config", _no_model)
    assert main(["train", "--config", config]) == 2
    assert capsys.readouterr().err == (
        f"vlm train: cannot write {run}: Permission denied; make it writable, "
        "or set train.output_dir=<a folder you can write>\n"
    )


@pytest.mark.parametrize("how", ["OSError", "torch.save"])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_no_staging_folder(
    tmp_path, tiny_model_config, llava_data, monkeypatch, capsys, how
):
    import shutil

    import vlm.files
    import vlm.train.checkpoint

    config = write_config(tmp_path, tiny_model_config, llava_data)
    if how == "OSError":
        def disk_full(tensors, path, *args, **kwargs):  # the RNG file, written after the model and optimizer
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(vlm.train.checkpoint, "save_file", disk_full)
    else:
        # What torch.save raises when the disk fills under it, its OSError lost; the disk has nothing left.
        def torch_save_on_a_full_disk(obj, path, *args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        monkeypatch.setattr(vlm.train.checkpoint.torch, "save", torch_save_on_a_full_disk)
        monkeypatch.setattr(vlm.files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert main(["train", "--config", config]) == 2
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"vlm train: cannot write {checkpoints / 'align-step-0000004'}: No space left on device; "
        "free space there and continue with --resume, or set train.output_dir=<a folder on another disk>"
    )
    assert list(checkpoints.iterdir()) == []  # the staging folder went, with the model and optimizer it held


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(tmp_path, tiny_model_config, llava_data, capsys):
    config = write_config(tmp_path, tiny_model_config, llava_data, stage="align")
    assert run_training(config, ["train.align.epochs=1"]) == 0
    marker = tmp_path / "hijacked"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    optimizer_file = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "optimizer.pt"
    torch.save({"state": Payload(), "param_groups": []}, optimizer_file)
    capsys.readouterr()
    assert main(["train", "--config", config, "--resume", "train.align.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"vlm train: refused to load {optimizer_file}: it holds more than plain tensors, and loading it could run "
        "code; delete that checkpoint folder to resume from an earlier one, or start over in a new train.output_dir"
    )


def test_augmented_training_caches_a_view_per_epoch_and_validates_on_the_originals(tmp_path, tiny_model_config,
                                                                                   llava_data, capsys):
    config = write_config(tmp_path, tiny_model_config, llava_data, stage="align")
    assert run_training(config, ["data.cache=on", "data.augment.views=3", "train.align.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "data.augment: 3 views of each training image" in out and "46 images to encode" in out
    (keys_file,) = (tmp_path / "cache").glob("*/shard-*.json")
    keys = json.loads(keys_file.read_text())["keys"]
    views = [k for k in keys if "#aug-" in k]
    # Two epochs read two of the three views of each of the 22 training images; the 2 held-out images as they are.
    assert len(views) == 2 * 22 and {k[-2:] for k in views} == {"-0", "-1"}
    assert len(keys) - len(views) == 2 and not any(k.split("#")[0] in keys for k in views)
    assert [r["val_loss"] for r in rows(tmp_path / "run") if "val_loss" in r]


def test_a_packed_stage_resumed_mid_epoch_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_config,
                                                                               llava_data, monkeypatch):
    import vlm.train.trainer as trainer

    # Two rows of 160 tokens a batch, each of one or two examples, leave each epoch several batches.
    args = ["train.instruct.packing=on", "train.instruct.batch_size=2", "data.max_length=128",
            "train.instruct.pack_length=160",
            "train.save_every=2", "train.eval_every=1000"]
    save_checkpoint, build_data = trainer.save_checkpoint, trainer.build_data
    batches_per_epoch = []

    def recording(*args, **kwargs):
        data = build_data(*args, **kwargs)
        batches_per_epoch.append(len(data.sampler))
        return data

    def save_then_die(output_dir, model, optimizer, scheduler, progress, keep_last):
        save_checkpoint(output_dir, model, optimizer, scheduler, progress, keep_last)
        assert 0 < progress.batches_in_epoch < batches_per_epoch[-1]
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_data", recording)
    finals = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, tiny_model_config, llava_data, stage="instruct")
        if name == "killed":
            monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
            with pytest.raises(KeyboardInterrupt):
                run_training(config, args)
            monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
            assert run_training(config, args, resume=True) == 0
        else:
            assert run_training(config, args) == 0
        finals[name] = load_file(tmp_path / name / "run" / "final" / "projector.safetensors")
    report = json.loads((tmp_path / "straight" / "run" / "report.json").read_text())
    # Samples count examples, not rows: three epochs of the 22 training records whose image opens.
    assert report["stages"]["instruct"]["samples"] == 3 * 22 and batches_per_epoch[0] * 2 < 22
    for key in finals["straight"]:
        torch.testing.assert_close(finals["killed"][key], finals["straight"][key], rtol=1e-5, atol=1e-6)
