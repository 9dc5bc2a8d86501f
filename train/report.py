"""The run report: wall time, throughput, GPU-hours, and an energy / CO2 estimate with its assumptions.

energy (kWh) = device power (W) x devices x wall time (h) x PUE / 1000;  CO2 (g) = energy x grid intensity.
Power defaults are board power limits (TDP), an upper bound on what the devices draw; override
train.device_watts with a measured figure. PUE 1.2 and 400 gCO2/kWh are overridable defaults
(train.pue, train.grid_gco2_per_kwh), near a modern data centre and a world-average grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Board power limits (W): the SXM H100/H200 and A100 specifications; an assumed 65 W for a desktop-class CPU.
DEVICE_WATTS = {"H100": 700.0, "H200": 700.0, "A100": 400.0, "L4": 72.0, "A10": 150.0, "T4": 70.0}
CPU_WATTS = 65.0
DEFAULT_GPU_WATTS = 300.0


def device_power(accelerator) -> tuple[str, float]:
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
        watts = next((w for key, w in DEVICE_WATTS.items() if key in name), DEFAULT_GPU_WATTS)
        return name, watts
    return "cpu", CPU_WATTS


def _significant(value: float) -> float:
    """Three significant figures: a fixed number of decimals reported a run of a fraction of a second as 0 kWh."""
    return float(f"{value:.3g}")


def write_report(output_dir: Path, stages: dict, train_config, accelerator) -> str:
    seconds = sum(s["seconds"] for s in stages.values())
    samples = sum(s["samples"] for s in stages.values())
    device, default_watts = device_power(accelerator)
    watts = train_config.device_watts or default_watts
    devices = accelerator.num_processes
    hours = seconds / 3600
    kwh = watts * devices * hours * train_config.pue / 1000
    report = {
        "device": device,
        "processes": devices,
        "wall_seconds": round(seconds, 1),
        "samples": samples,
        "samples_per_s": round(samples / seconds, 2) if seconds else None,
        "gpu_hours": _significant(hours * devices) if device != "cpu" else 0.0,
        "energy_kwh": _significant(kwh),
        "co2_g": _significant(kwh * train_config.grid_gco2_per_kwh),
        "assumptions": {"device_watts": watts, "pue": train_config.pue,
                        "grid_gco2_per_kwh": train_config.grid_gco2_per_kwh,
                        "formula": "kWh = W x devices x h x PUE / 1000; gCO2 = kWh x grid"},
        "stages": stages,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"| {k} | {v} |" for k, v in report.items() if k not in ("assumptions", "stages")]
    text = "\n".join(["| metric | value |", "| --- | --- |", *lines,
                      f"\nAssumptions: {report['assumptions']}", f"Stages: {json.dumps(stages)}"])
    (output_dir / "report.md").write_text(text + "\n")
    return text


def plot_losses(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in rows):
        train = [(r["step"] + offset, r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]
        val = [(r["step"] + offset, r["val_loss"]) for r in rows if r["stage"] == stage and "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label=f"{stage} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o--", label=f"{stage} validation")
        offset = max([offset] + [s for s, _ in train + val])
    ax.set_xlabel("optimizer step (stages back to back)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
