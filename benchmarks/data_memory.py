"""Memory of a 665k-record LLaVA JSON read by 8 DataLoader workers: vlm's compact records against a plain
Python list of the parsed records (what most training scripts hold, and what vlm held before).

    python -m benchmarks.make_llava_data --out runs/mem --images 2000 --no-parquet
    python -m benchmarks.data_memory --json runs/mem/llava_instruct.json --image-root runs/mem/images --records 665000

The JSON is repeated up to --records. Each layout is read in a process of its own: the records are
loaded, then 8 workers (fork) read every record once, as an epoch does. Memory is sampled across the
process and its workers: RSS, PSS (shared pages counted once), and private (USS: pages a process has
to itself, which is what a worker copied from the parent by touching reference counts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table


def _read_all(dataset, workers: int) -> int:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=512, num_workers=workers, collate_fn=len)
    return sum(loader)


class PlainList:
    """The usual approach: the parsed JSON as a list of dicts, indexed by workers."""

    def __init__(self, path: str):
        with open(path) as f:
            self.records = json.load(f)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        return record.get("image"), [turn["value"] for turn in record["conversations"]]


class Compact:
    """vlm's Records (vlm/data/sources.py) from the same file."""

    def __init__(self, path: str, image_root: str):
        from vlm.config import DataSource
        from vlm.data.sources import load_examples

        self.records = load_examples(DataSource(kind="llava", path=path, image_root=image_root), "instruct")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        example = self.records[i]
        return example.key, example.messages


def measure(layout: str, path: str, image_root: str, workers: int) -> dict:
    import psutil

    from benchmarks.train_end_to_end import Sampler

    start = time.perf_counter()
    dataset = PlainList(path) if layout == "plain list" else Compact(path, image_root)
    loaded = time.perf_counter() - start
    main_after_load = psutil.Process().memory_info().rss
    sampler = Sampler(psutil.Process().pid, period=0.5)
    sampler.start()
    read = _read_all(dataset, workers)
    sampler.stop.set()
    sampler.join()
    return {"layout": layout, "records": read, "load s": loaded, "main RSS after load GiB": main_after_load / 2**30,
            "peak RSS GiB": max(s["rss"] for s in sampler.samples) / 2**30,
            "peak PSS GiB": max(s["pss"] for s in sampler.samples) / 2**30,
            "peak private GiB": max(s["uss"] for s in sampler.samples) / 2**30,
            "processes": max(s["processes"] for s in sampler.samples)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="a LLaVA-format JSON to repeat")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--measure", choices=["plain list", "vlm records"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # one layout, in a fresh process, so neither inherits the other's memory
        print(json.dumps(measure(args.measure, args.json, args.image_root, args.workers)))
        return
    base = json.loads(Path(args.json).read_text())
    records = [{**base[i % len(base)], "id": str(i)} for i in range(args.records)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.json"
        path.write_text(json.dumps(records))
        size = path.stat().st_size
        del records, base
        for layout in ("plain list", "vlm records"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.data_memory", "--json", str(path), "--image-root",
                                  args.image_root, "--workers", str(args.workers), "--measure", layout],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{args.records:,} records, {size / 2**30:.2f} GiB of JSON, {args.workers} workers")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
