"""Does the learning report's style score mean something? On the micro model: LoRAs of known
strength (one LoRA at scale 0, 0.5 and 1; the same run's files after fewer and more steps)
and two different style sets (datasets_examples' bands and stripes), scored with both
statistics on each set's axis; printed as a table.

    python benchmarks/style_score.py                 # trains two LoRAs (demo config), ~5 min
    python benchmarks/style_score.py --work runs/ss  # keeps (and reuses) the trained LoRAs

The scale and step rows should rise in order. Both sets lie in the same direction from the
base (colourful diagonal stripes against its plain backgrounds), so each scores high on the
other's base-to-style axis too; which set a LoRA learnt shows on the line from one set to the
other (the last table).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETS = {"bands": "zkbands", "stripes": "zkstripes"}
STEPS, EVERY = 300, 100


def train(name: str, work: Path) -> Path:
    """The demo config on set `name`, its LoRA every EVERY steps; the run folder."""
    out = work / name
    if (out / f"{name}.safetensors").is_file():
        return out
    cmd = [sys.executable, "-m", "sdlora", "train", str(REPO / "configs" / "demo.toml"),
           f"dataset.path={REPO / 'datasets_examples' / name}", f"dataset.trigger={SETS[name]}",
           f"output.dir={out}", f"output.name={name}", f"train.steps={STEPS}",
           f"train.save_every={EVERY}", "output.step_loras=true", "sample.prompts=[]",
           "sample.report_images=0", "output.bundle=false", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the trained LoRAs (default: temp)")
    parser.add_argument("--images", type=int, default=32, help="report images per set")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp())
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(SETS, pool.map(lambda n: train(n, work), SETS), strict=True))

    import numpy as np
    import torch

    from sdlora.generate import Generator
    from sdlora.models import load_base
    from sdlora.prompts import LoraSpec
    from sdlora.report import (
        GRAM,
        PALETTE,
        features,
        paired_scores,
        render_sets,
        report_prompts,
        style_scores,
        style_set,
    )

    torch.set_num_threads(1)
    base = load_base("micro")
    styles = {n: style_set(base, REPO / "datasets_examples" / n, t, 32) for n, t in SETS.items()}
    style_features = {n: features(base, images) for n, (images, _) in styles.items()}
    rows, origins, trained = [], {}, {}
    for name in SETS:
        files = [(f"{name}.safetensors", 1.0, f"{STEPS} steps")]
        if name == "bands":  # known strengths of one LoRA
            files += [(f"{name}-step{s:06d}.safetensors", 1.0, f"{s} steps") for s in (100, 200)]
            files += [(f"{name}.safetensors", s, f"{STEPS} steps, scale {s}") for s in (0, 0.5)]
        for file, scale, label in files:
            generator = Generator.load(load_base("micro"), [LoraSpec(runs[name] / file, scale)])
            captions = styles[name][1]
            prompts, with_trigger = report_prompts(captions, SETS[name], args.images)
            seeds = [1000 + i for i in range(args.images)]
            sets = render_sets(generator.base, prompts, with_trigger, seeds, 20, 5.0, 32)
            feats = {k: features(generator.base, v) for k, v in sets.items()}
            origins[name] = feats["base_with"]
            if file == f"{name}.safetensors" and scale == 1.0:
                trained[name] = feats["lora_with"]
            for axis in SETS:  # the prompts of the set the LoRA learnt, scored on each axis
                scores = paired_scores(feats, style_features[axis], prompts)
                rows.append((f"{name} LoRA, {label}", axis, scores))
    print(f"| LoRA | axis | Gram shift | Gram drift | palette shift | palette drift |"
          f"  ({args.images} images per set, ± standard error)")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, axis, s in rows:
        g, p = s[GRAM], s[PALETTE]
        print(f"| {label} | {axis}"
              f" | {g['style_shift_with_trigger']:.2f} ± {g['style_shift_se']:.2f}"
              f" | {g['drift_without_trigger']:.2f} ± {g['drift_se']:.2f}"
              f" | {p['style_shift_with_trigger']:.2f} ± {p['style_shift_se']:.2f}"
              f" | {p['drift_without_trigger']:.2f} ± {p['drift_se']:.2f} |")  # fmt: skip
    print("\n| style set | on the axis of | Gram | palette |  (0: base, 1: the axis' set)")
    print("|---|---|---|---|")
    for name, other in (("stripes", "bands"), ("bands", "stripes")):
        cells = []
        for stat in (GRAM, PALETTE):
            parts = zip(origins[other][stat], style_features[other][stat],
                        style_features[name][stat], strict=True)  # fmt: skip
            cross = [style_scores(o.mean(0), s.mean(0), o.mean(0), o.mean(0), t.mean(0))["shift"]
                     for o, t, s in parts]  # fmt: skip
            cells.append(f"{np.mean(cross):.2f}")
        print(f"| {name} | {other} | {' | '.join(cells)} |")
    print(
        "\n| samples with the trigger of | on the line bands (0) -> stripes (1): Gram | palette |"
    )
    print("|---|---|---|")
    for name in SETS:
        cells = []
        for stat in (GRAM, PALETTE):
            parts = zip(trained[name][stat], style_features["bands"][stat],
                        style_features["stripes"][stat], strict=True)  # fmt: skip
            line = [style_scores(a.mean(0), x.mean(0), a.mean(0), a.mean(0), b.mean(0))["shift"]
                    for x, a, b in parts]  # fmt: skip
            cells.append(f"{np.mean(line):.2f}")
        print(f"| {name} LoRA, {STEPS} steps | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
