"""LoRA files: the kohya/Civitai format sd-scripts writes, its metadata and hashes.

A kohya module name is `prefix + "_" + module_path.replace(".", "_")`; every module has
`.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank] and a 0-dim float `.alpha`.
SD 1.x/2.x files use diffusers-layout UNet names; SDXL files use the SAI (LDM) block names,
as sd-scripts writes them. Text-encoder names keep the `text_model_` level that
transformers 5 dropped from `CLIPTextModel`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig

from sdlora.algos import ALGOS, DORA_FILE_TENSORS, network_args, network_module
from sdlora.errors import SdloraError
from sdlora.families import FAMILIES, LABEL_KEY, known_label
from sdlora.lora import Lora, most_common
from sdlora.naming import kohya_name
from sdlora.stfile import sha256_after_header

# Precision names sdlora takes (output.dtype, generate --dtype) and their torch dtypes.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_TAGS_PER_DIR = 500
MAX_TAG_CHARS = 200
MODELSPEC_VERSION = "1.0.1"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
FORMATS = ("kohya", "diffusers")


def to_kohya_state_dict(lora: Lora, family: str, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """The tensors of a kohya file for `lora` in `dtype` (fp16, bf16 or fp32)."""
    tensors = {}
    for component, path, module in lora.modules():
        name = kohya_name(component, path, family)
        roles = cast_tensors(module, dtype, f"{component}:{path}")
        for suffix, role in {**ALGOS[module.algo].file_tensors, **DORA_FILE_TENSORS}.items():
            if role in roles:
                tensors[name + suffix] = roles[role]
    return tensors


def cast_tensor(tensor: torch.Tensor, dtype: str, where: str) -> torch.Tensor:
    """A further tensor of a module (DoRA's scale) as written in `dtype`, finite or refused."""
    cast = tensor.to(DTYPES[dtype]).contiguous()
    if not cast.isfinite().all():
        raise SdloraError(
            f"LoRA module {where} holds values that are not finite in {dtype}; nothing was "
            "written. Write bf16 or fp32 (output.dtype, --dtype)"
        )
    return cast


def cast_module(module, dtype: str, where: str) -> tuple[torch.Tensor, ...]:
    """(down, up, alpha) of a LoRA module as written in `dtype` (see `cast_tensors`)."""
    roles = cast_tensors(module, dtype, where)
    return roles["down"], roles["up"], roles["alpha"]


def cast_tensors(module, dtype: str, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a module by role, alpha included, as written in `dtype`, refused unless
    every value is finite after the cast: a weight past fp16's range (65504) becomes infinity
    there."""
    torch_dtype = DTYPES[dtype]
    originals = module.tensors()
    roles = {role: t.to(torch_dtype).contiguous() for role, t in originals.items()}
    roles["alpha"] = torch.tensor(float(module.alpha), dtype=torch_dtype)
    for role, tensor in roles.items():
        original = originals.get(role)
        if not tensor.isfinite().all():
            was_finite = original is not None and bool(original.isfinite().all())
            raise SdloraError(
                f"LoRA module {where} "
                + (f"does not fit in {dtype} (values beyond its range)" if was_finite
                   else "holds NaN or infinity")
                + "; nothing was written. Write bf16 or fp32 (output.dtype, --dtype), or "
                "lower train.lr and resume from the last checkpoint"
            )  # fmt: skip
    return roles


def build_metadata(
    *,
    family: str,
    title: str,
    rank: int,
    alpha: float,
    trigger_words: list[str],
    resolution: int,
    base_name: str = "",
    tag_frequency: dict[str, dict[str, int]] | None = None,
    training: dict[str, object] | None = None,
    base_label: str = "",
    algo: str = "lora",
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dora: bool = False,
    lokr_factor: int | None = None,
    decompose_both: bool | None = None,
) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata sd-scripts writes, every value a string.

    `tag_frequency` is `{dataset_dir_name: {tag: count}}`; it is capped so the header stays
    small. `training` holds further `ss_*` fields (without the prefix): steps, lr, seed, ...
    `base_label` (e.g. `Pony`) goes into `ss_base_model_label`: `ss_base_model_version` and
    `modelspec.architecture` keep the values loaders key on, which have no room for it.
    `algo`, `conv_rank`, `conv_alpha`, `dora`, `lokr_factor` and `decompose_both` name the
    adapter (see `sdlora.algos`).
    """
    spec = FAMILIES[family]
    tags = _cap_tags(tag_frequency or {})
    if trigger_words and not tags:
        tags["trigger"] = {}
    for counts in tags.values():
        for word in trigger_words:
            counts.setdefault(word.lower(), 1)
    meta = {
        "ss_output_name": title,
        "ss_network_module": network_module(algo, dora),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": spec.ss_base_model_version,
        "ss_v2": str(family in ("sd2", "sd2-v")),
        "ss_sd_model_name": base_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": json.dumps(tags, ensure_ascii=False),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": spec.architecture,
        "modelspec.implementation": spec.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if spec.prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": ", ".join(trigger_words),
    }
    args = network_args(
        algo, conv_rank, conv_alpha, dora, -1 if lokr_factor is None else lokr_factor,
        bool(decompose_both),
    )  # fmt: skip
    if args:
        meta["ss_network_args"] = json.dumps(args)
    if base_label:
        meta[LABEL_KEY] = known_label(base_label) or base_label
    for key, value in (training or {}).items():
        meta[f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_kohya(
    path: str | Path, lora: Lora, family: str, metadata: dict[str, str], dtype: str = "fp16"
) -> Path:
    """Write `lora` as a kohya `.safetensors` file with hashes added to `metadata`.

    The file appears whole or not at all: it is written beside the target and renamed.
    """
    tensors = to_kohya_state_dict(lora, family, dtype)
    metadata = dict(metadata)
    metadata.update(safetensors_hashes(tensors, metadata))
    metadata["modelspec.hash_sha256"] = "0x" + metadata["sshs_model_hash"]
    return write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))


def safetensors_hashes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, str]:
    """`sshs_model_hash` (sha256 of the bytes after the header: A1111's and Civitai's AutoV3)
    and `sshs_legacy_hash` (sha256 of 64 KiB at offset 1 MiB, first 8 hex digits)."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    return {
        "sshs_model_hash": sha256_after_header(data),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename.

    The temporary name is short whatever `path`'s is. A failure (a full disk, a name the
    file system refuses) is one error naming the file; nothing is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix[:16], dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write_synced(f, data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e, len(data)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_synced(f, data: bytes) -> None:
    """Write `data` to the open file `f` and flush it to the disk."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


class WriteError(SdloraError, OSError):
    """A failed write, worded for the user; still an OSError for callers that skip what cannot
    be written (e.g. a caption in a read-only folder)."""

    def __init__(self, message: str, error: Exception):
        OSError.__init__(self, getattr(error, "errno", None), getattr(error, "strerror", None))
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_error(path: Path, error: Exception, size: int) -> WriteError:
    """One line for a failed write of `size` bytes to `path`: for a full disk, how much is needed.

    `error` is an OSError, or a library's wrapping of one (safetensors' SafetensorError).
    """
    full = getattr(error, "errno", None) == errno.ENOSPC or "StorageFull" in str(error)
    if full:
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        except OSError:
            free = 0
        return WriteError(
            f"{path} could not be written: the disk is full (it needs {_mb(size)}, "
            f"{_mb(free)} free); free some space and run again",
            error,
        )
    reason = (
        getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    )
    return WriteError(f"{path} could not be written: {reason}", error)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _cap_tags(tag_frequency: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Keep the most frequent tags per folder, each cut to a sane length (sd-scripts #1380)."""
    capped = {}
    for folder, counts in tag_frequency.items():
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_TAGS_PER_DIR]
        capped[folder] = {tag[:MAX_TAG_CHARS]: n for tag, n in top}
    return capped


def to_diffusers_state_dict(
    lora: Lora, dtype: str = "fp16"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a diffusers/peft file (`pytorch_lora_weights.safetensors`).

    diffusers files carry no alpha tensor: each component's rank and alpha go into the
    `lora_adapter_metadata` JSON as a peft LoraConfig, with per-module patterns where they differ.
    """
    tensors = {}
    configs: dict[str, object] = {}
    for component in sorted(lora.components):
        modules = lora.components[component]
        other = next((m.algo for m in modules.values() if m.algo != "lora"), None)
        if other:
            raise SdloraError(
                f"a {ALGOS[other].title} LoRA is written in the kohya/LyCORIS layout only "
                "(diffusers loads that layout for LoRA/LoCon alone); write it as kohya"
            )
        for path, module in modules.items():
            down, up, _ = cast_module(module, dtype, f"{component}:{path}")
            tensors[f"{component}.{path}.lora_A.weight"] = down
            tensors[f"{component}.{path}.lora_B.weight"] = up
            if module.dora:  # peft's own shapes: [out], conv [1, out, 1, 1]
                scale = module.extra["dora_scale"].flatten()
                scale = scale.reshape(1, -1, 1, 1) if up.dim() == 4 else scale
                tensors[f"{component}.{path}.lora_magnitude_vector"] = cast_tensor(
                    scale, dtype, f"{component}:{path}"
                )
        rank = most_common([m.rank for m in modules.values()])
        alpha = most_common([m.alpha for m in modules.values()])
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=sorted(modules),
            rank_pattern={p: m.rank for p, m in modules.items() if m.rank != rank},
            alpha_pattern={p: m.alpha for p, m in modules.items() if m.alpha != alpha},
            use_dora=any(m.dora for m in modules.values()),
        ).to_dict()
        for key, value in config.items():
            configs[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return tensors, {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(configs, sort_keys=True)}


def save_lora(
    path: str | Path,
    lora: Lora,
    family: str,
    file_format: str = "kohya",
    metadata: dict[str, str] | None = None,
    dtype: str = "fp16",
) -> Path:
    """Write `lora` as a kohya (`sd-scripts`/Civitai) or diffusers file."""
    metadata = dict(metadata or {})
    if file_format == "kohya":
        return save_kohya(path, lora, family, metadata, dtype)
    tensors, own = to_diffusers_state_dict(lora, dtype)
    metadata.update(own)
    return write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))
