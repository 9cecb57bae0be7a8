"""How the demo's learning report moves with rank, steps and the drift levers: the demo run
(`configs/demo.toml` on the micro model) and single changes to it, printed as a table.

    python benchmarks/demo_options.py              # every row, two runs at a time
    python benchmarks/demo_options.py --jobs 1 --rows 0 1 2  # the demo, three seeds

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
    args = parser.parse_args()
    rows = [ROWS[i] for i in args.rows] if args.rows else ROWS
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda o: run(row_name(o), o, Path(tmp)), rows))
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


if __name__ == "__main__":
    main()
