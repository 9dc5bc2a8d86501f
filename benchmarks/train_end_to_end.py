"""`vlm train` end to end on real files against the step-only rate of the same model: does the data path
(JPEG decoding, the feature cache, batching) keep the GPU fed?

    python -m benchmarks.scale_setup --out runs/scale --images 100000 --tokenizer DIR
    python -m benchmarks.train_end_to_end --preset runs/scale/llava-scale.yaml --stage align \\
        --run pixels data.cache=off train.align.max_steps=1500 \\
        --run cached data.cache=on data.align.limit=30000 train.align.epochs=2

Each --run is one `vlm train` process (the preset plus those overrides) in a fresh output folder;
a run with data.cache=on is compared with the cached step-only rate, any other with the pixel one.
While it runs, GPU utilisation (nvidia-smi) and the memory of the process and its DataLoader
workers are sampled: RSS, PSS (pages shared by several processes counted once) and "private", each
process's own pages (USS), which is what a worker copied rather than shares. PSS also counts the
memory-mapped cache shards: page cache the kernel can drop. Its steady rate is the median samples/s
of the logged windows after the first quarter.
The reference is `benchmarks.train_throughput` (vlm compiled, the same backbones and batch, at the
run's mean padded sequence length), measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.common import print_table


class Sampler(threading.Thread):
    """GPU utilisation and the process tree's memory, every `period` seconds, until stopped."""

    def __init__(self, pid: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.period = psutil.Process(pid), period
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append({"time": time.time(), "gpu": _gpu_busy(), **self._memory()})
            self.stop.wait(self.period)

    def _memory(self) -> dict:
        rss = pss = uss = 0
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {"rss": 0, "pss": 0, "uss": 0, "processes": 0}
        for process in processes:
            try:
                info = process.memory_full_info()
                rss, pss, uss = rss + info.rss, pss + getattr(info, "pss", info.rss), uss + info.uss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return {"rss": rss, "pss": pss, "uss": uss, "processes": len(processes)}


def _gpu_busy() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def run_training(preset: Path, stage: str, overrides: list[str], output_dir: Path) -> dict:
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, "-m", "vlm.cli", "train", "--config", str(preset), "--stage", stage,
               f"train.output_dir={output_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    started = time.time()
    process = subprocess.Popen(command)
    sampler = Sampler(process.pid)
    sampler.start()
    code = process.wait()
    sampler.stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"vlm train exited with {code}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["stage"] == stage and "samples_per_s" in r]
    steady = windows[len(windows) // 4:] or windows
    first, last = steady[0]["time"], steady[-1]["time"]
    during = [s for s in sampler.samples if first <= s["time"] <= last]
    busy = [s["gpu"] for s in during if s["gpu"] is not None]
    report = json.loads((output_dir / "report.json").read_text())
    return {
        "samples/s": statistics.median(r["samples_per_s"] for r in steady),
        "tokens/sample": statistics.mean(r["tokens_per_sample"] for r in steady),
        "GPU busy %": statistics.mean(busy) if busy else None,
        "peak RSS GiB": max(s["rss"] for s in sampler.samples) / 2**30,
        "peak PSS GiB": max(s["pss"] for s in sampler.samples) / 2**30,
        "peak private GiB": max(s["uss"] for s in sampler.samples) / 2**30,
        "processes": max(s["processes"] for s in sampler.samples),
        "wall s": time.time() - started,
        "stage s": report["stages"][stage]["seconds"],
        "skipped": report["stages"][stage]["skipped"],
    }


def step_only(preset: Path, tokens_per_sample: float, batch: int) -> dict:
    """benchmarks.train_throughput's compiled vlm rows at the run's padded length, in a process of its own."""
    model = yaml.safe_load(preset.read_text())["model"]
    vision = "vit-l14-336" if "l14-336" in model["vision"]["name"] else "vit-b16"
    lm = "smollm2-135m" if "135m" in model["lm"]["name"] else "smollm2-360m"
    image_tokens = {"vit-l14-336": 576, "vit-b16": 196}[vision]
    text = max(16, round(tokens_per_sample) - image_tokens)
    out = Path(f"/tmp/step_only_{int(time.time())}.json")
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--pairs", f"{vision}:{lm}", "--stages", "1",
               "--systems", "vlm compiled", "--batch", str(batch), "--text-tokens", str(text), "--json", str(out)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    rows = json.loads(out.read_text())
    return {row["system"]: row["samples/s"] for row in rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--stage", default="align", choices=["align", "instruct"])
    parser.add_argument("--run", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), required=True,
                        help="a named run and its overrides; repeat for several")
    parser.add_argument("--out", type=Path, default=Path("runs/end_to_end"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    batch = yaml.safe_load(args.preset.read_text())["train"][args.stage]["batch_size"]
    rows = []
    for name, *overrides in args.run:
        result = run_training(args.preset, args.stage, overrides, args.out / name.replace(" ", "_"))
        rows.append({"run": name, "overrides": " ".join(overrides), **result})
        print(json.dumps(rows[-1]), flush=True)
    reference = step_only(args.preset, statistics.mean(r["tokens/sample"] for r in rows), batch)
    for row in rows:
        cached = "data.cache=on" in row["overrides"].split()
        ref = reference["vlm compiled + feature cache" if cached else "vlm compiled"]
        row["step-only samples/s"] = ref
        row["share of step-only"] = row["samples/s"] / ref
    print()
    print_table(rows, ["run", "samples/s", "step-only samples/s", "share of step-only", "GPU busy %",
                       "tokens/sample", "peak private GiB", "peak PSS GiB", "processes", "stage s", "skipped"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
