"""Fusing LoRAs into a base and saving the result (`sdlora merge`): a new diffusers folder,
or one `.safetensors` checkpoint in the original layout that A1111/Forge/ComfyUI load.

The output appears whole or not at all: it is written under a temporary name beside the
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
from sdlora.generate import Generator
from sdlora.prompts import LoraSpec

# Names of pickle checkpoints: merge writes a folder or a .safetensors file, so these are a mistake.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_merge_target(out: Path) -> None:
    """Refuse an output that is neither a new folder nor a new .safetensors file (before the
    base is loaded)."""
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(
            f"merge writes a diffusers folder or one .safetensors checkpoint, not a {out.suffix} "
            f"file; give a folder path or a .safetensors name for -o (e.g. {out.with_suffix('')})"
        )
    if os.path.lexists(out):
        raise SdloraError(f"{out} already exists; choose a new name for the merged model")


def merge(
    base: str,
    loras: list[LoraSpec],
    out: Path,
    allow_pickle: bool = False,
    dtype: str = "fp16",
) -> Path:
    """Fuse `loras` (at their scales) into `base` in float32 and save a diffusers folder, or,
    for `out` ending in .safetensors, one original-layout checkpoint in `dtype`."""
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
    if out.suffix.lower() == ".safetensors":
        from sdlora.ldm import save_merged

        try:
            return save_merged(out, generator, dtype)
        except (OSError, SafetensorError) as e:
            raise write_error(out, e, size) from None
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
