"""Epoch time with and without the latent cache, training tiny:sd1 on the CPU.

    .venv/bin/python benchmarks/latent_cache.py [--images 32] [--size 768] [--epochs 2]

Without the cache every step decodes, resizes and VAE-encodes its images; with it, each image
is encoded once before the loop (that time is shown apart) and the loop reads latents.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from preflight import make_images

from sdlora import load_config, train


def run(folder: Path, out: Path, cached: bool, steps: int, batch: int, resolution: int):
    config = load_config(
        None,
        [
            "model.base=tiny:sd1",
            f"dataset.path={folder}",
            "dataset.trigger=zkstyle",
            f"dataset.resolution={resolution}",
            "dataset.repeats=1",
            f"dataset.cache_latents={str(cached).lower()}",
            f"output.dir={out}",
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            "lora.text_encoder=false",
            "sample.steps=1",
            "sample.report_images=0",
        ],
    )
    start = time.perf_counter()
    train(config, progress=False)
    total = time.perf_counter() - start
    loop = json.loads((out / "run.json").read_text())["wall_time_s"]
    return total, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs per setting (best kept)")
    args = parser.parse_args()
    steps = args.epochs * args.images // args.batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        make_images(folder, args.images, args.size)
        for i in range(args.repeat):  # interleaved, so a busy moment hits both settings
            for cached in (True, False):
                out = Path(tmp) / f"run{i}{cached}"
                total, loop = run(folder, out, cached, steps, args.batch, args.resolution)
                rows.append((cached, total, loop))
    print(
        f"tiny:sd1, {args.images} images of {args.size}x{args.size} at resolution "
        f"{args.resolution}, batch {args.batch}, {args.epochs} epochs ({steps} steps), CPU"
    )
    print(f"best of {args.repeat} runs each; the whole run adds model load, samples, encoding")
    print("| latent cache | epoch (s) | loop (s) | whole run (s) |")
    print("|---|---|---|---|")
    for cached in (True, False):
        loop = min(r[2] for r in rows if r[0] == cached)
        total = min(r[1] for r in rows if r[0] == cached)
        name = "on" if cached else "off"
        print(f"| {name} | {loop / args.epochs:.2f} | {loop:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
