"""The `sdlora` command: parses arguments, calls the library, prints. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from sdlora.errors import SdloraError, printable

# `sdlora init --family F` starts from configs/F-style.toml.
INIT_FAMILIES = ("sd15", "sd21-768", "sdxl")
PACKAGE = Path(__file__).resolve().parent


def examples_root() -> Path:
    """Where configs/ and datasets_examples/ live: inside an installed wheel or the checkout."""
    packaged = Path(__file__).resolve().parent / "_examples"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent


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


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdlora", description="Train Stable Diffusion style LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA from a TOML config")
    p.add_argument("config", help="path to a TOML config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override a config value"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="train the demo LoRA (configs/demo.toml on the example set)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override a config value"
    )

    p = sub.add_parser("init", help="write a commented config for a folder of images")
    p.add_argument("dir", type=Path, help="folder of training images")
    p.add_argument(
        "--family", choices=INIT_FAMILIES, default="sd15", help="base family preset (sd15)"
    )
    p.add_argument("--trigger", help="trigger word (default: the preset's zkstyle)")
    p.add_argument("--base", help="base checkpoint: .safetensors file, diffusers folder, hub id")
    p.add_argument("-o", "--out", type=Path, help="config to write (default: DIR's name.toml)")

    add_generate_parser(sub)

    p = sub.add_parser(
        "merge", help="fuse LoRAs into a base: a diffusers folder or one .safetensors checkpoint"
    )
    p.add_argument("--base", required=True)
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        type=Path,
        help="new diffusers folder, or OUT.safetensors: one checkpoint A1111/ComfyUI load",
    )
    p.add_argument(
        "--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="of a .safetensors -o"
    )
    p.add_argument("--allow-pickle", action="store_true", help="read pickle LoRAs (weights only)")

    p = sub.add_parser("inspect", help="family, ranks, triggers, hashes and metadata of a LoRA")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickle file (weights only)")

    p = sub.add_parser("export", help="convert a LoRA between kohya and diffusers formats")
    p.add_argument("file", type=Path)
    p.add_argument("--format", required=True, choices=("kohya", "diffusers"))
    p.add_argument("-o", "--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl"), help="if undetectable")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickle file (weights only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("bundle", help="a folder to publish on Civitai or the Hugging Face Hub")
    p.add_argument("source", type=Path, metavar="RUN_DIR|LORA", help="run folder or LoRA file")
    p.add_argument("-o", "--out", type=Path, help="bundle folder (default: RUN_DIR/bundle)")
    p.add_argument("--license", help="model card license (default: the base's, e.g. openrail++)")
    p.add_argument("--base", help="base to draw the previews with (default: the run's)")
    p.add_argument("--weight", type=float, default=1.0, help="recommended LoRA weight (1)")
    p.add_argument("--no-previews", action="store_true", help="draw no preview images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("push", help="upload a bundle to the Hugging Face Hub")
    p.add_argument("bundle", type=Path, help="folder written by `sdlora bundle`")
    p.add_argument("--repo", required=True, help="model repo, user/name (made if missing)")
    p.add_argument("--private", action="store_true", help="make a new repo private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded")

    p = sub.add_parser("check", help="preflight a dataset folder: every file's status, buckets")
    p.add_argument("dir", type=Path, help="folder of training images")
    p.add_argument("--trigger", default="", help="trigger word (reports captions lacking it)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (512)")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (.txt)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--follow-external-links",
        action="store_true",
        help="use symbolic links leading outside the folder (dataset.follow_external_links)",
    )

    p = sub.add_parser("caption", help="write caption files for images that have none")
    p.add_argument("dir", type=Path, help="folder of training images")
    p.add_argument("--trigger", required=True, help="trigger word, put first in every caption")
    p.add_argument(
        "--template",
        default=None,
        help="caption text: {trigger}, {name} (file name), {caption} (model's text)",
    )
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (.txt)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    p.add_argument("--captioner", choices=["blip"], default=None, help="caption with a model")
    p.add_argument("--model", default=None, help="captioner checkpoint: local folder or hub id")

    p = sub.add_parser("ui", help="the studio: a local web UI (needs `pip install sdlora[ui]`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (7860)")
    p.add_argument("--workspace", default="studio", help="folder for runs and jobs (./studio)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="required for a non-local --host")
    return parser


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with options allowed anywhere among `section.key=value` overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands back the overrides that follow an option as unrecognised.
    if extra and "overrides" in args and all("=" in a and a[0] != "-" for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per warning: sdlora's own as `sdlora: warning: <text>`; a library's named."""
    text = " ".join(str(message).split())
    path = Path(filename).resolve()
    if not path.is_relative_to(PACKAGE):
        parts = path.parts
        origin = parts[parts.index("site-packages") + 1] if "site-packages" in parts else path.stem
        text = f"{origin}: {text}"
    print(f"sdlora: warning: {printable(text)}", file=sys.stderr)


def _run(args) -> int:
    from sdlora.checkpoint import Interrupted

    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that has gone is noticed here, not at exit
        return code
    except Interrupted as e:
        print(f"sdlora: {printable(str(e))}", file=sys.stderr)
        return e.exit_code
    except SdloraError as e:
        print(f"sdlora: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sdlora check DIR | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a real fault, with its traceback
            raise
        # A path the system refuses (too long, no permission) wherever it was first opened.
        print(f"sdlora: error: {printable(str(e.filename))}: {e.strerror}", file=sys.stderr)
        return 2


def cmd_train(args) -> int:
    from sdlora.train import train

    result = train(args.config, tuple(args.overrides), progress=not args.no_progress)
    _print_result(result)
    return 0


def cmd_demo(args) -> int:
    from sdlora.train import train

    config = examples_root() / "configs" / "demo.toml"
    out = Path(args.out).resolve()
    result = train(config, (f"output.dir={out}", *args.overrides))
    _print_result(result)
    return 0


def cmd_init(args) -> int:
    from sdlora.presets import write_starter_config

    preset = examples_root() / "configs" / f"{args.family}-style.toml"
    out = args.out or Path(f"{args.dir.resolve().name}.toml")
    config = write_starter_config(preset, out, args.dir, args.trigger, args.base)
    trigger, resolution = config.dataset.trigger, config.dataset.resolution
    print(f"wrote {out} ({args.family} preset: {preset.name})")
    if args.base is None:
        print(f"set model.base in it (now {config.model.base}) to your base checkpoint")
    if args.trigger is None:
        print(f"the trigger word is {trigger!r}; --trigger WORD picks another")
    print(f"then: sdlora check {args.dir} --trigger {trigger} --resolution {resolution}")
    print(f"      sdlora train {out}")
    return 0


def cmd_generate(args) -> int:
    from sdlora.generate import (
        Generator,
        LoraSpec,
        check_output_folder,
        check_sampler,
        check_settings,
        grid_images,
        parse_grid,
        prompt_loras,
        save_images,
        with_triggers,
    )
    from sdlora.images import save_grid

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


def cmd_merge(args) -> int:
    from sdlora.generate import LoraSpec
    from sdlora.merge import check_merge_target, merge

    check_merge_target(args.out)
    loras = [LoraSpec.parse(t) for t in args.lora]
    out = merge(args.base, loras, args.out, args.allow_pickle, dtype=args.dtype)
    print(printable(str(out)))
    return 0


def cmd_inspect(args) -> int:
    import json

    from sdlora.lorafile import inspect_lora

    info = inspect_lora(args.file, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    modules = ", ".join(f"{c} {n}" for c, n in info["modules"].items() if n)
    sure = (
        " (unsure: " + "; ".join(info["family_evidence"]) + ")" if info["family_ambiguous"] else ""
    )
    print(f"file:        {printable(info['file'])} ({info['format']})")
    print(f"family:      {info['family'] or 'unknown'}{sure}")
    print(f"prediction:  {info['prediction_type']}")
    print(f"base model:  {info['base_label'] or '-'}")
    print(f"modules:     {modules}")
    print(f"algo:        {info['algo']}")
    print(f"rank/alpha:  {info['ranks']} / {info['alphas']}")
    print(printable(f"triggers:    {', '.join(info['trigger_words']) or '-'}"))
    print(f"AutoV2:      {info['hashes']['autov2']}   AutoV3: {info['hashes']['autov3']}")
    if bad := info["non_finite_modules"]:
        print(f"NOT FINITE:  {len(bad)} module(s) hold NaN or infinity (first: {bad[0]}); "
              "generate, merge and export refuse this file")  # fmt: skip
    for key in sorted(info["metadata"]):
        value = info["metadata"][key]
        value = value if len(value) <= 100 else value[:97] + "..."
        print(printable(f"  {key} = {value}"))
    return 0


def cmd_export(args) -> int:
    from sdlora.export import save_lora
    from sdlora.lorafile import read_lora

    if args.out.exists() and not args.overwrite:
        raise SdloraError(f"{args.out} already exists; pass --overwrite or choose another -o")
    if args.out.resolve() == args.file.resolve():
        raise SdloraError("the output file is the input file; choose another -o")
    lora = read_lora(args.file, allow_pickle=args.allow_pickle)
    family = args.family or lora.family
    if family is None:
        raise SdloraError(f"the family of {args.file} cannot be told; pass --family")
    metadata = {
        k: v for k, v in lora.metadata.items() if not k.startswith(("sshs_", "lora_adapter"))
    }
    metadata.pop("modelspec.hash_sha256", None)
    save_lora(args.out, lora, family, args.format, metadata, args.dtype)
    print(printable(str(args.out)))
    return 0


def cmd_bundle(args) -> int:
    from sdlora.bundle import write_bundle

    out = write_bundle(args.source, args.out, license=args.license, base=args.base,
                       weight=args.weight, previews=not args.no_previews,
                       overwrite=args.overwrite, device=args.device)  # fmt: skip
    print(out)
    return 0


def cmd_push(args) -> int:
    from sdlora.hub import bundle_files, check_repo_id, push_bundle

    if args.dry_run:
        check_repo_id(args.repo)
        files = bundle_files(args.bundle)
        for name, size in files:
            print(f"{size:>12,}  {name}")
        total = sum(size for _, size in files)
        print(f"{len(files)} files, {total:,} bytes -> {args.repo} (dry run: nothing uploaded)")
        return 0
    print(push_bundle(args.bundle, args.repo, private=args.private))
    return 0


def cmd_check(args) -> int:
    import json

    from sdlora.dataset import scan_folder
    from sdlora.preflight import format_report, report

    if args.resolution < 32 or args.resolution % 32:
        raise SdloraError(
            f"--resolution must be a multiple of 64 (32 for micro), got {args.resolution}"
        )
    scan = scan_folder(
        args.dir,
        args.trigger,
        args.resolution,
        caption_ext=args.caption_ext,
        follow_external_links=args.follow_external_links,
    )
    data = report(scan)
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else format_report(data))
    return 0 if data["trainable"] else 2


def cmd_caption(args) -> int:
    from sdlora.autocaption import blip_captioner, write_captions

    captioner = blip_captioner(args.model) if args.captioner == "blip" else None
    run = write_captions(
        args.dir, args.trigger, args.template, args.caption_ext, args.overwrite, captioner
    )
    for path in run.written:
        print(f"wrote {path}")
    for problem in run.skipped:
        print(f"skipped {problem.path}: {problem.reason}")
    kept = f", kept {len(run.kept)} existing (--overwrite replaces them)" if run.kept else ""
    print(f"{len(run.written)} caption(s) written{kept}")
    return 0


def cmd_ui(args) -> int:
    from sdlora.studio import launch

    launch(args.host, args.port, args.workspace, args.auth)
    return 0


def _print_result(result) -> None:
    if not result.is_main:
        return
    print(f"LoRA:    {result.lora_path}")
    if result.samples:
        print(f"samples: {result.run_dir / 'samples'}")
    print(f"logs:    {result.run_dir / 'log.jsonl'} (TensorBoard: {result.run_dir / 'logs'})")
    print(f"progress: {result.run_dir / 'progress.png'} (loss, validation loss, style per "
          "checkpoint; checkpoints.json)")  # fmt: skip
    best = result.lora_path.with_name(f"{result.lora_path.stem}-best.safetensors")
    if best.is_file():
        print(f"best:    {best} (the step chosen; checkpoints.png shows the steps)")
    if result.learning is not None:
        print(f"report:  {result.run_dir / 'learning_report.json'}")
        print(f"A/B:     {result.run_dir / 'ab_grid.png'} (base vs LoRA, without / with trigger)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s); see {result.run_dir / 'run.json'}")


COMMANDS = {
    "train": cmd_train,
    "demo": cmd_demo,
    "init": cmd_init,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "bundle": cmd_bundle,
    "push": cmd_push,
    "check": cmd_check,
    "caption": cmd_caption,
    "ui": cmd_ui,
}
