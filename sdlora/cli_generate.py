"""`sdlora generate`: its many settings (declared here) and the command itself."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from sdlora.errors import printable


def _unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(
            f"width and height must be positive multiples of 8, got {text}"
        )
    return w, h


def add_generate_parser(sub) -> None:
    """`sdlora generate`: its settings are many, so they are declared here."""
    p = sub.add_parser("generate", help="generate images with LoRAs applied")
    p.add_argument("--base", required=True, help="base: folder, .safetensors, hub id, tiny:sd1")
    p.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA (repeatable)"
    )
    p.add_argument("--lora-dir", type=Path, help="where <lora:NAME:SCALE> prompt tags look")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    p.add_argument("--size", type=_size, default=None, metavar="WxH")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=4096 * 4096,
        help="largest width x height --size may ask for (default 4096x4096)",
    )
    p.add_argument("--num", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    p.add_argument("--sampler", default="ddim", help="euler, euler_a, dpmpp_2m, ddim, ...")
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="what the base predicts, when its file cannot tell (default: the base's, else "
        "the LoRA's metadata)",
    )
    p.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="the base was trained with zero terminal SNR (default: from the base or LoRA)",
    )
    p.add_argument(
        "--guidance-rescale",
        type=_unit_fraction,
        help="φ from 0 to 1 (default: 0.7 with zero terminal SNR, else 0)",
    )
    p.add_argument(
        "--trigger",
        default="warn",
        choices=("auto", "warn", "off"),
        help="auto: prepend the LoRAs' missing trigger words; warn (default): warn if none",
    )
    p.add_argument("--grid", metavar="AXIS=V1,V2", help="scales=0,0.5,1 or trigger=on,off")
    p.add_argument("--no-fuse", action="store_true", help="keep LoRAs as separate layers")
    p.add_argument("--allow-pickle", action="store_true", help="read pickle LoRAs (weights only)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="auto: fp16 on CUDA, fp32 on the CPU",
    )


def cmd_generate(args) -> int:
    from sdlora.generate import Generator, check_sampler
    from sdlora.grids import grid_images, parse_grid
    from sdlora.images import save_grid
    from sdlora.prompts import (
        LoraSpec,
        check_output_folder,
        check_settings,
        prompt_loras,
        save_images,
        with_triggers,
    )

    check_sampler(args.sampler)
    check_settings(args.steps, args.cfg, args.seed, args.num, args.size, args.max_pixels)
    check_output_folder(args.out)
    axis, values = parse_grid(args.grid) if args.grid else (None, [])
    prompt, tagged = prompt_loras(args.prompt, args.lora_dir)
    loras = [LoraSpec.parse(text) for text in args.lora] + tagged
    generator = Generator.load(
        args.base,
        loras,
        fuse=not (args.no_fuse or args.grid),
        allow_pickle=args.allow_pickle,
        device=args.device,
        dtype=args.dtype,
        prediction_type=args.prediction_type,
        zero_terminal_snr=args.zero_terminal_snr,
    )
    render = dict(negative=args.negative, steps=args.steps, cfg=args.cfg, seed=args.seed,
                  size=args.size, sampler=args.sampler, rescale=args.guidance_rescale)  # fmt: skip
    if axis:
        prompt = prompt if axis == "trigger" else with_triggers(prompt, loras, args.trigger)
        images, labels = grid_images(generator, axis, values, prompt, **render)
        # A grid carries its first cell's infotext, as A1111's grids do.
        info = {"parameters": images[0].info["parameters"]}
        path = save_grid(images, labels, args.out / f"grid_{axis}.png", columns=len(images),
                         text=info)  # fmt: skip
        print(printable(str(path)))
        return 0
    prompt = with_triggers(prompt, loras, args.trigger)
    for path in save_images(generator.render(prompt, num=args.num, **render), args.out):
        print(printable(str(path)))
    return 0
