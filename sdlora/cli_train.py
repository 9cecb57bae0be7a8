"""`sdlora train`, `demo`, `init`, `check`, `caption` and `ui`: the commands around a training
run. Each parses nothing (see `sdlora.cli`), calls the library and prints."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError


def cmd_train(args) -> int:
    from sdlora.train import train

    result = train(args.config, tuple(args.overrides), progress=not args.no_progress)
    _print_result(result)
    return 0


def cmd_demo(args) -> int:
    from sdlora.cli import examples_root
    from sdlora.train import train

    config = examples_root() / "configs" / "demo.toml"
    out = Path(args.out).resolve()
    result = train(config, (f"output.dir={out}", *args.overrides))
    _print_result(result)
    return 0


def cmd_init(args) -> int:
    from sdlora.cli import examples_root
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
