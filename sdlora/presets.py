"""Starting configs for `sdlora init`: a shipped family preset, comments kept, with the user's
folder, trigger word and base filled in."""

from __future__ import annotations

from pathlib import Path

import tomlkit

from sdlora.config import Config, check_file_name
from sdlora.configfile import config_from_dict, read_config_text
from sdlora.errors import SdloraError


def write_starter_config(
    preset: Path, out: Path, dataset: Path, trigger: str | None = None, base: str | None = None
) -> Config:
    """Write `preset` to `out` with dataset.path, and trigger and model.base when given, set;
    the run folder is `runs/<out's stem>` beside it. Refuses to replace an existing `out`;
    nothing is written unless the result loads as a config."""
    if out.exists():
        raise SdloraError(f"{out} already exists; choose another -o (sdlora init never replaces)")
    folder = out.resolve().parent
    if not folder.is_dir():
        raise SdloraError(f"folder {out.parent} does not exist; create it or choose another -o")
    if not dataset.is_dir():
        raise SdloraError(f"dataset folder {dataset} does not exist; name your images' folder")
    if folder.is_relative_to(dataset.resolve()):  # its runs/ would land among the images
        raise SdloraError(
            f"{out} is inside the dataset folder {dataset}; write the config outside it "
            "(-o ../my-style.toml)"
        )
    doc = tomlkit.parse(preset.read_text(encoding="utf-8"))
    doc["dataset"]["path"] = _from(folder, dataset)
    if trigger is not None:
        doc["dataset"]["trigger"] = trigger
        if _plain_name(trigger):
            doc["output"]["name"] = trigger
    if base is not None:
        doc["model"]["base"] = _from(folder, Path(base)) if Path(base).exists() else base
    doc["output"]["dir"] = f"runs/{out.stem}"
    header = (
        f"# Written by `sdlora init` from the {preset.name} preset for {dataset}.\n"
        f"# Train with: sdlora train {out}\n"
    )
    text = header + tomlkit.dumps(doc)
    config = config_from_dict(read_config_text(text, folder, str(out)), str(out))
    with open(out, "x", encoding="utf-8") as f:  # "x": never replaces a file made meanwhile
        f.write(text)
    return config


def _from(folder: Path, path: Path) -> str:
    """`path` as the config at `folder` should say it: relative when beside or below it."""
    path = path.resolve()
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def _plain_name(text: str) -> bool:
    try:
        check_file_name("output.name", text)
    except SdloraError:
        return False
    return True
