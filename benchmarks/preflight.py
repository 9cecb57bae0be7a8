"""Preflight time: the full scan (decode, EXIF, normalise, hash, caption) of N images.

    .venv/bin/python benchmarks/preflight.py [--images 100] [--size 1024]

Writes N distinct JPEG and PNG photos-like images (noise over gradients) with captions into a
temporary folder, then times `scan_folder` on it and prints a table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.dataset import scan_folder


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    base = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1)], -1)
    for i in range(count):
        noise = rng.normal(0, 25, (size, size, 3)).astype(np.float32)
        pixels = np.concatenate([base, base[..., :1]], -1) + noise + i
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 2:
            image.save(folder / f"{i:03d}.png")
        else:
            image.save(folder / f"{i:03d}.jpg", quality=92)
        (folder / f"{i:03d}.txt").write_text(f"zkstyle, picture {i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        make_images(folder, args.images, args.size)
        made = time.perf_counter() - start
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            scan = scan_folder(folder, "zkstyle", resolution=args.resolution)
            times.append(time.perf_counter() - start)
        assert len(scan.examples) == args.images, scan.skipped
    print(f"preflight of {args.images} images of {args.size}x{args.size} (half JPEG, half PNG)")
    print(f"CPU cores: {os.cpu_count()}; writing the set took {made:.1f} s")
    print("| run | seconds | images/s |")
    print("|---|---|---|")
    for i, t in enumerate(times, 1):
        print(f"| {i} | {t:.2f} | {args.images / t:.1f} |")
    print(f"| best | {min(times):.2f} | {args.images / min(times):.1f} |")


if __name__ == "__main__":
    main()
