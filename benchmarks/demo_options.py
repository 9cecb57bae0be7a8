"""How the demo's learning report moves with rank, steps and the drift levers: the demo run
(`configs/demo.toml` on the micro model) and single changes to it, printed as a table.

    python benchmarks/demo_options.py              # every row, two runs at a time
    python benchmarks/demo_options.py --jobs 1 --rows 0 1 2  # the demo, three seeds
    python benchmarks/demo_options.py --row "train.lr_scheduler=cosine" --seeds 0 1 2

With --seeds, every row runs once per training seed and a second table gives each row's
mean and spread (largest minus smallest) over the seeds: how much the LoRA itself, not the
report, changes from one run to the next. The report's prompts and seeds never change.

Each row is a real `sdlora train` in its own process at one torch thread; wall time is the
whole run (prior images, training, samples, report), so it grows when runs share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = [
    [],
    ["train.seed=1"],
    ["train.seed=2"],
    ["lora.rank=8", "lora.alpha=8"],
    ["lora.rank=4", "lora.alpha=4"],
    ["lora.rank=8", "lora.alpha=8", "train.prior_images=0"],
    ["lora.rank=8", "lora.alpha=8", "train.prior_images=0", "train.steps=600"],
    ["lora.rank=8", "lora.alpha=8", "train.steps=150"],
    ["lora.rank=8", "lora.alpha=8", "train.steps=600"],
    ["lora.rank=8", "lora.alpha=8", "dataset.caption_dropout=0.1"],
    ["lora.rank=8", "lora.alpha=8", "train.prior_weight=2"],
    ["lora.rank=8", "lora.alpha=8", "train.lr=2.5e-4"],
    ["lora.rank=8", "lora.alpha=8", "lora.text_encoder=false"],
    ["train.lr=2.5e-4"],
    ["train.prior_weight=2", "train.seed=1"],
]
"""Overrides of each row; the first is the demo itself."""


def row_name(overrides: list[str]) -> str:
    return " ".join(overrides) or "demo"


def run(name: str, overrides: list[str], work: Path) -> dict:
    out = work / name.replace(" ", "_").replace("=", "-")
    cmd = [sys.executable, "-m", "sdlora", "train", str(REPO / "configs" / "demo.toml"),
           *overrides, f"output.dir={out}", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - started
    if result.returncode:
        return {"name": name, "error": result.stderr.strip().splitlines()[-1]}
    report = json.loads((out / "learning_report.json").read_text())
    loop = json.loads((out / "run.json").read_text())
    return {"name": name, "wall": wall, "loop": loop["wall_time_s"],
            "samples_per_s": loop["samples_per_s"], **report}  # fmt: skip


def cell(scores: dict, key: str, se: str) -> str:
    return f"{scores[key]:.2f} ± {scores[se]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--rows", type=int, nargs="*", help="row numbers (0 = the demo)")
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        help="a row of your own: overrides separated by spaces (repeatable)",
    )
    parser.add_argument("--seeds", type=int, nargs="*", help="run every row at these train.seed")
    parser.add_argument("--keep", help="write the runs here (default: a temporary folder)")
    args = parser.parse_args()  # fmt: skip
    rows = [ROWS[i] for i in args.rows or ()] + [r.split() for r in args.row]
    rows = rows or ROWS
    if args.seeds:
        rows = [[*r, f"train.seed={s}"] for r in rows for s in args.seeds]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        work = Path(args.keep or tmp)
        results = list(pool.map(lambda o: run(row_name(o), o, work), rows))
    print("| run | wall | loop | samples/s | Gram shift | Gram drift | palette shift "
          "| palette drift |  (± standard error over the report's images)")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        cells = [
            cell(r["statistics"][name], key, se)
            for name in ("vae_encoder_gram", "palette_histogram_4x4x4")
            for key, se in (("style_shift_with_trigger", "style_shift_se"),
                            ("drift_without_trigger", "drift_se"))
        ]  # fmt: skip
        print(f"| {r['name']} | {r['wall']:.0f} s | {r['loop']:.0f} s | "
              f"{r['samples_per_s']:.1f} | {' | '.join(cells)} |")  # fmt: skip
    if args.seeds and len(args.seeds) > 1:
        print_spread(results, len(args.seeds))


STATS = [(s, k) for s in ("vae_encoder_gram", "palette_histogram_4x4x4")
         for k in ("style_shift_with_trigger", "drift_without_trigger")]  # fmt: skip


def print_spread(results: list[dict], seeds: int) -> None:
    """Per row: each statistic's mean over the seeds and its spread (max - min)."""
    print("\n| row | Gram shift | Gram drift | palette shift | palette drift |  "
          "(mean, spread = largest - smallest over the seeds)")  # fmt: skip
    print("|---|---|---|---|---|")
    for start in range(0, len(results), seeds):
        group = [r for r in results[start : start + seeds] if "error" not in r]
        if not group:
            continue
        name = group[0]["name"].rsplit("train.seed=", 1)[0].strip() or "demo"
        cells = []
        for stat, key in STATS:
            values = [r["statistics"][stat][key] for r in group]
            cells.append(f"{sum(values) / len(values):.2f}, {max(values) - min(values):.2f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
