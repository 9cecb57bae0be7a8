"""Generation speed with LoRAs fused into the weights or kept as separate layers.

    python benchmarks/generate_speed.py [--base tiny:sd1] [--images 8] [--steps 20] [--loras 2]
                                        [--rounds 3]

Trains nothing: it writes random LoRAs of rank 16 on the base's attention (UNet and text
encoder), then renders the same prompts and seeds with no LoRA, with the LoRAs as peft
layers, and with them fused, and prints images/s for each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sdlora.export import save_lora
from sdlora.generate import Generator
from sdlora.lora import random_lora
from sdlora.models import load_base
from sdlora.prompts import LoraSpec


def random_lora_file(base_spec: str, path: Path, seed: int) -> Path:
    base = load_base(base_spec)
    lora = random_lora(base, rank=16, alpha=16, std=0.01, seed=seed)
    return save_lora(path, lora, base.family, "kohya", {}, "fp16")


def images_per_second(generator: Generator, images: int, steps: int) -> float:
    generator.render("warm up", steps=2)
    start = time.perf_counter()
    generator.render("a red circle on a blue background", steps=steps, num=images)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny:sd1")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loras", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        specs = [
            LoraSpec(random_lora_file(args.base, Path(tmp) / f"l{i}.safetensors", i), 0.7)
            for i in range(args.loras)
        ]
        rows = [
            ("no LoRA", Generator.load(args.base, [])),
            (f"{args.loras} LoRAs, unfused", Generator.load(args.base, specs, fuse=False)),
            (f"{args.loras} LoRAs, fused", Generator.load(args.base, specs, fuse=True)),
        ]
        best = {name: 0.0 for name, _ in rows}
        for _ in range(args.rounds):  # interleaved rounds, best of each: robust to a busy CPU
            for name, generator in rows:
                rate = images_per_second(generator, args.images, args.steps)
                best[name] = max(best[name], rate)
        print(
            f"{args.base}, {args.images} images x {args.steps} steps, DDIM, best of {args.rounds}"
        )
        print(f"{'setting':<24} {'images/s':>9}")
        for name, rate in best.items():
            print(f"{name:<24} {rate:>9.2f}")


if __name__ == "__main__":
    main()
