"""How much of the learning report is the report's own noise, and how much the LoRA? Each
LoRA's report is drawn on several disjoint sets of seeds (blocks of the report's size, the
first one being the seeds `sdlora train` uses), and every figure is printed per block:

- the spread of one LoRA over the blocks is the report's noise (what other seeds change);
- the spread of the LoRAs on the same block (paired seeds) is how much the LoRAs differ;
- unpaired: each block's LoRA images against the base's images of other seeds, to show what
  drawing both with the same seeds saves.

    python benchmarks/report_noise.py runs/demo                  # one run folder
    python benchmarks/report_noise.py a/x.safetensors b/x.safetensors --blocks 6

The report's settings (trigger, style set, resolution, sampling) are read from the first run's
config.toml (`--config` for bare LoRA files). The drift is printed twice: as the report
gives it (the median of the per-image moves) and as the plain mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIGURES = [  # (column, statistic, key)
    ("Gram shift", "vae_encoder_gram", "style_shift_with_trigger"),
    ("Gram drift", "vae_encoder_gram", "drift_without_trigger"),
    ("Gram drift (plain mean)", "vae_encoder_gram", "drift_mean_without_trigger"),
    ("palette shift", "palette_histogram_4x4x4", "style_shift_with_trigger"),
    ("palette drift", "palette_histogram_4x4x4", "drift_without_trigger"),
    ("palette drift (plain mean)", "palette_histogram_4x4x4", "drift_mean_without_trigger"),
    ("re-drawn (Gram)", "vae_encoder_gram", "redrawn_without_trigger"),
]


def lora_and_config(source: Path, config: Path | None) -> tuple[Path, Path]:
    if source.is_dir():
        return next(p for p in source.glob("*.safetensors") if "-step" not in p.name
                    and not p.stem.endswith("-best")), config or source / "config.toml"  # fmt: skip
    if config is None:
        raise SystemExit(f"{source} is a LoRA file: pass --config (its run's config.toml)")
    return source, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, nargs="+", help="run folders or LoRA files")
    parser.add_argument("--config", type=Path, help="config.toml for LoRA files")
    parser.add_argument("--blocks", type=int, default=6, help="disjoint sets of seeds")
    parser.add_argument("--images", type=int, help="images per set (default: the config's)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from sdlora.configfile import load_config
    from sdlora.generate import Generator
    from sdlora.models import load_base
    from sdlora.prompts import LoraSpec
    from sdlora.report import (
        base_only,
        features,
        paired_scores,
        render,
        report_prompts,
        style_set,
    )

    torch.set_num_threads(1)
    pairs = [lora_and_config(s, args.config) for s in args.sources]
    config = load_config(pairs[0][1])
    c_data, c_sample = config.dataset, config.sample
    images = args.images or c_sample.report_images
    base = load_base(config.model.base)
    style_images, captions = style_set(base, c_data.path, c_data.trigger, c_data.resolution)
    style = features(base, style_images)
    prompts, with_trigger = report_prompts(captions, c_data.trigger, images)

    def draw(model, who: str, block: int) -> dict:
        seeds = [c_sample.seed + 1000 + block * images + i for i in range(images)]
        shot = (seeds, c_sample.steps, c_sample.cfg, c_data.resolution)
        return {f"{who}_with": features(model, render(model, with_trigger, *shot)),
                f"{who}_without": features(model, render(model, prompts, *shot))}  # fmt: skip

    started = time.time()
    base_sets = None
    scores, unpaired = [], []  # per LoRA, per block
    for lora, _ in pairs:
        model = Generator.load(load_base(config.model.base), [LoraSpec(lora, 1.0)]).base
        for m in (model.unet, *model.text_encoders.values()):
            m.eval()
        with torch.no_grad():
            if base_sets is None:
                with base_only(model):
                    base_sets = [draw(model, "base", b) for b in range(args.blocks)]
            drawn = [draw(model, "lora", b) for b in range(args.blocks)]
        scores.append([paired_scores({**base_sets[b], **drawn[b]}, style)
                       for b in range(args.blocks)])  # fmt: skip
        # Unpaired: the base's images of the next block's seeds (same prompts, other seeds).
        unpaired.append([paired_scores({**base_sets[(b + 1) % args.blocks], **drawn[b]}, style)
                         for b in range(args.blocks)])  # fmt: skip

    def table(per_lora: list) -> np.ndarray:  # (loras, blocks, figures)
        return np.array([[[s[stat][key] for _, stat, key in FIGURES] for s in per_block]
                         for per_block in per_lora])  # fmt: skip

    values = table(scores)
    print(
        f"{len(pairs)} LoRA(s), {args.blocks} blocks of {images} report images per set, "
        f"{time.time() - started:.0f} s\n"
    )
    print("| LoRA | " + " | ".join(f for f, _, _ in FIGURES) + " |")
    print("|---" * (len(FIGURES) + 1) + "|")
    for (lora, _), v in zip(pairs, values, strict=True):
        cells = [f"{a:.3f} ({b:.3f})" for a, b in zip(v[0], np.ptp(v, axis=0), strict=True)]
        print(f"| {lora.parent.name}/{lora.name} | " + " | ".join(cells) + " |")
    print(
        "\n(first block = the report as `sdlora train` draws it; in brackets, the spread "
        "= largest - smallest over the blocks: the report's own noise)"
    )
    alone = np.ptp(table(unpaired), axis=1)  # (loras, figures)
    print("\n| the same, unpaired (spread over the blocks) | "
          + " | ".join(f for f, _, _ in FIGURES) + " |")  # fmt: skip
    print("|---" * (len(FIGURES) + 1) + "|")
    for (lora, _), row in zip(pairs, alone, strict=True):
        print(f"| {lora.parent.name}/{lora.name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    if len(pairs) > 1:
        between = np.ptp(values, axis=0)  # (blocks, figures): LoRA to LoRA on the same seeds
        print("\n| LoRA to LoRA, same seeds | " + " | ".join(f for f, _, _ in FIGURES) + " |")
        print("|---" * (len(FIGURES) + 1) + "|")
        for label, row in (("first block", between[0]), ("mean over blocks", between.mean(0)),
                           ("largest block", between.max(0)),
                           ("the blocks' means", np.ptp(values.mean(axis=1), axis=0))):  # fmt: skip
            print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in row) + " |")


if __name__ == "__main__":
    main()
