"""What each adapter algo learns on the demo at about the same file size: the demo run
(`configs/demo.toml`, a rank-16 LoRA on the micro model) trained as LoRA, LoCon, LoHa, LoKr
and DoRA, with the learning report and the file size of each printed as a table.

    python benchmarks/algos_quality.py            # every algo, two runs at a time
    python benchmarks/algos_quality.py --jobs 1 --algos lora loha

Each algo's rank (LoKr: its factor, both Kronecker factors whole) is the one, among a few,
whose adapter has the parameter count nearest the demo LoRA's, counted on the micro model's
layers before anything is trained. Everything else (steps, learning rate, prior images,
seed) is the demo's. Each run is a real `sdlora train` in its own process at one torch thread.
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
DEMO = REPO / "configs" / "demo.toml"
# Settings tried for each algo: (label, overrides); the one nearest the LoRA's size is run.
CANDIDATES = {
    "lora": [("rank 16", ["lora.rank=16", "lora.alpha=16"])],
    "locon": [
        (f"rank {r}, conv {r}", ["lora.algo=locon", f"lora.rank={r}", f"lora.alpha={r}"])
        for r in (4, 5, 6, 8, 12, 16)
    ],
    "loha": [
        (f"rank {r}, conv {r}", ["lora.algo=loha", f"lora.rank={r}", f"lora.alpha={r}"])
        for r in (2, 4, 6, 8, 10, 12)
    ],
    "lokr": [
        (
            f"factor {f}, whole factors",
            ["lora.algo=lokr", "lora.rank=10000", "lora.alpha=10000", f"lora.lokr_factor={f}"],
        )
        for f in (2, 4, 8, 16)
    ],  # fmt: skip
    "dora": [("rank 16", ["lora.rank=16", "lora.alpha=16", "lora.dora=true"])],
}


def adapter_parameters(overrides: list[str]) -> int:
    """Trainable parameters of the demo's adapter with `overrides`, on the micro model."""
    from sdlora import load_config
    from sdlora.lora import TEXT_ENCODER_ATTENTION, UNET_TARGET_PRESETS, inject_lora
    from sdlora.models import load_base

    c = load_config(DEMO, overrides).lora
    base = load_base("micro")
    options = {"algo": c.algo, "dora": c.dora}
    if c.algo == "lokr":
        options.update(lokr_factor=c.lokr_factor, decompose_both=c.lokr_decompose_both)
    total = inject_lora(
        base.unet, c.rank, c.alpha, UNET_TARGET_PRESETS[c.unet_targets],
        conv_rank=c.conv_rank, conv_alpha=c.conv_alpha, **options,
    )  # fmt: skip
    if c.text_encoder:
        total += inject_lora(base.text_encoder, c.rank, c.alpha, TEXT_ENCODER_ATTENTION, **options)
    return total


def choose(algo: str, target: int) -> tuple[str, list[str], int]:
    """The candidate of `algo` whose parameter count is nearest `target`."""
    sized = [(label, o, adapter_parameters(o)) for label, o in CANDIDATES[algo]]
    return min(sized, key=lambda s: abs(s[2] - target))


def run(algo: str, label: str, overrides: list[str], work: Path) -> dict:
    out = work / algo
    cmd = [sys.executable, "-m", "sdlora", "train", str(DEMO), *overrides,
           f"output.dir={out}", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - started
    if result.returncode:
        return {"algo": algo, "label": label, "error": result.stderr.strip().splitlines()[-1]}
    report = json.loads((out / "learning_report.json").read_text())
    size = (out / "zkbands.safetensors").stat().st_size
    return {"algo": algo, "label": label, "wall": wall, "size": size, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--algos", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args()
    target = adapter_parameters(CANDIDATES["lora"][0][1])
    chosen = {algo: choose(algo, target) for algo in args.algos}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = [(a, label, o) for a, (label, o, _) in chosen.items()]
        results = list(pool.map(lambda j: run(*j, Path(tmp)), jobs))
    print("| algo | setting | parameters | file (fp16) | style shift with trigger "
          "| drift without trigger | any change without trigger | wall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        params = chosen[r["algo"]][2]
        if "error" in r:
            print(f"| {r['algo']} | {r['label']} | {params:,} | failed: {r['error']} | | | | |")
            continue
        shift, drift = r["style_shift_with_trigger"], r["drift_without_trigger"]
        change = r["change_without_trigger"]
        print(f"| {r['algo']} | {r['label']} | {params:,} | {r['size'] / 1e3:.0f} kB "
              f"| {shift:.2f} | {drift:.2f} | {change:.2f} | {r['wall']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
