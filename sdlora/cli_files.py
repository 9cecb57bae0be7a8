"""The file tools: `sdlora merge`, `inspect`, `export`, `resize`, `extract`, `bundle` and
`push`. Each calls the library and prints."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError, printable


def cmd_merge(args) -> int:
    from sdlora.merge import check_merge_target, merge
    from sdlora.prompts import LoraSpec

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
    print(f"algo:        {info['algo']}{' with DoRA' if info['dora'] else ''}")
    print(f"modules:     {modules}")
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


def check_output(out, *inputs, overwrite: bool) -> None:
    """Refuse to replace a file unasked, or to write over an input."""
    if out.exists() and not overwrite:
        raise SdloraError(f"{out} already exists; pass --overwrite or choose another -o")
    if any(Path(i).resolve() == out.resolve() for i in inputs):
        raise SdloraError("the output file is an input file; choose another -o")


def cmd_resize(args) -> int:
    from sdlora.export import save_lora
    from sdlora.resize import read_resizable, resize_lora

    check_output(args.out, args.file, overwrite=args.overwrite)
    lora = read_resizable(args.file, allow_pickle=args.allow_pickle)
    family = args.family or lora.family
    if family is None:
        raise SdloraError(f"the family of {args.file} cannot be told; pass --family")
    resized, report = resize_lora(lora, args.rank, args.conv_rank, args.dynamic,
                                  args.dynamic_param, source=str(args.file))  # fmt: skip
    save_lora(args.out, resized, family, lora.file_format, resized.metadata, args.dtype)
    for line in report.lines(args.verbose):
        print(printable(line))
    print(printable(str(args.out)))
    return 0


def cmd_extract(args) -> int:
    from sdlora.export import build_metadata, save_lora
    from sdlora.extract import extract_lora
    from sdlora.families import FAMILIES
    from sdlora.models import load_base

    check_output(args.out, args.base, args.tuned, overwrite=args.overwrite)
    base = load_base(args.base, allow_pickle=args.allow_pickle)
    tuned = load_base(args.tuned, allow_pickle=args.allow_pickle)
    lora, report = extract_lora(base, tuned, args.rank, args.conv_rank)
    conv = args.conv_rank is not None
    metadata = build_metadata(
        family=lora.family, title=args.out.stem, rank=args.rank, alpha=float(args.rank),
        trigger_words=[], resolution=FAMILIES[lora.family].resolution, base_name=base.name,
        algo="locon" if conv else "lora", conv_rank=args.conv_rank,
        conv_alpha=float(args.conv_rank) if conv else None,
    )  # fmt: skip
    save_lora(args.out, lora, lora.family, "kohya", metadata, args.dtype)
    for line in report.lines(args.verbose):
        print(printable(line))
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
