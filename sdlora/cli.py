"""The `sdlora` command: parses arguments and dispatches to the commands (`cli_train`,
`cli_generate`, `cli_files`), which call the library and print. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from sdlora.cli_files import (
    cmd_bundle,
    cmd_export,
    cmd_extract,
    cmd_inspect,
    cmd_merge,
    cmd_push,
    cmd_resize,
)
from sdlora.cli_generate import add_generate_parser, cmd_generate
from sdlora.cli_train import cmd_caption, cmd_check, cmd_demo, cmd_init, cmd_train, cmd_ui
from sdlora.errors import SdloraError, printable

# `sdlora init --family F` starts from configs/F-style.toml.
INIT_FAMILIES = ("sd15", "sd21-768", "sdxl")
PACKAGE = Path(__file__).resolve().parent


def examples_root() -> Path:
    """Where configs/ and datasets_examples/ live: inside an installed wheel or the checkout."""
    packaged = Path(__file__).resolve().parent / "_examples"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent


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

    p = sub.add_parser("resize", help="lower a LoRA/LoCon file's rank by SVD (reports kept energy)")
    p.add_argument("file", type=Path)
    p.add_argument("--rank", required=True, type=int, help="new rank of the linear modules")
    p.add_argument("--conv-rank", type=int, help="new rank of 3x3 convs (default: --rank)")
    p.add_argument(
        "--dynamic",
        metavar="METHOD",
        help="sv_ratio, sv_cumulative or sv_fro: a rank per module, at most --rank",
    )
    p.add_argument("--dynamic-param", type=float, help="sv_ratio: >= 1; others: fraction (0, 1]")
    p.add_argument("-o", "--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl"), help="if undetectable")
    p.add_argument("--verbose", action="store_true", help="report every module")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickle file (weights only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints")
    p.add_argument("--base", required=True, help="the original: folder, .safetensors, tiny:sd1")
    p.add_argument("--tuned", required=True, help="the fine-tune of --base")
    p.add_argument("--rank", required=True, type=int)
    p.add_argument("--conv-rank", type=int, help="also the ResNet convs at this rank (LoCon)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--verbose", action="store_true", help="report every module")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt bases (weights only)")
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


COMMANDS = {
    "train": cmd_train,
    "demo": cmd_demo,
    "init": cmd_init,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "resize": cmd_resize,
    "extract": cmd_extract,
    "bundle": cmd_bundle,
    "push": cmd_push,
    "check": cmd_check,
    "caption": cmd_caption,
    "ui": cmd_ui,
}
