"""Fusing LoRAs into a base and saving the result as a new diffusers folder (`sdlora merge`).

The folder appears whole or not at all: it is written under a temporary name beside the
target and renamed. Fused weights holding NaN or infinity are refused before anything is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from sdlora.errors import SdloraError
from sdlora.export import write_error
from sdlora.generate import Generator, LoraSpec

# Names of single-file checkpoints: merge writes a folder, so these are a mistake.
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def check_merge_target(out: Path) -> None:
    """Refuse an output that is not a new folder path (before the base is loaded)."""
    if out.suffix.lower() in FILE_SUFFIXES:
        raise SdloraError(
            f"merge writes a diffusers folder, not a single {out.suffix} file; "
            f"give a folder path for -o (e.g. {out.with_suffix('')})"
        )
    if os.path.lexists(out):
        raise SdloraError(f"{out} already exists; choose a new folder for the merged model")


def merge(base: str, loras: list[LoraSpec], out: Path, allow_pickle: bool = False) -> Path:
    """Fuse `loras` (at their scales) into `base` in float32 and save a diffusers folder."""
    check_merge_target(out)
    generator = Generator.load(
        base, loras, fuse=True, allow_pickle=allow_pickle, device="cpu", dtype="fp32"
    )
    pipe = generator.pipeline()
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    models = {"unet": pipe.unet, **generator.base.text_encoders}
    for component, model in models.items():
        for name, param in model.named_parameters():
            if not param.isfinite().all():
                raise SdloraError(
                    f"the merged {component} weight {name} is not finite (the LoRAs' update is "
                    "too large at these scales); nothing was written. Lower the scales"
                )
    size = sum(p.numel() * p.element_size() for m in (*models.values(), pipe.vae)
               for p in m.parameters())  # fmt: skip
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
        pipe.save_pretrained(tmp)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:
        raise write_error(out, e, size) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
