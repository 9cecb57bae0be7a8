"""Reading LoRA files, ours or anyone's, into the canonical form (`sdlora.lora.Lora`).

Understood: kohya/Civitai files (diffusers-layout and SAI/LDM UNet names; `lora_te_`,
`lora_te1_`, `lora_te2_`), diffusers/peft files (`unet.`/`text_encoder.`/`text_encoder_2.`
with `lora_A`/`lora_B`, and the older `lora.down`/`lora_linear_layer`/attention-processor
forms). Files that are something else get a message saying what they are.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.errors import SdloraError
from sdlora.lora import Lora, LoraModule
from sdlora.naming import split_kohya_name

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LYCORIS_MARKERS = {
    "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "oft_blocks": "OFT (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_mid": "LoCon with CP decomposition (LyCORIS)",
}
FULL_MODEL_MARKERS = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
    "conv_in.weight",
)
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
# diffusers/peft key endings -> which matrix they hold.
DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # attention processors
    ".alpha": "alpha",
}  # fmt: skip
DIFFUSERS_COMPONENTS = ("unet", "text_encoder_2", "text_encoder")
METADATA_KEY = "lora_adapter_metadata"


def read_safetensors_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, from its header alone.

    Raises a message naming the file for a missing, empty, truncated, git-lfs pointer or
    non-safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise SdloraError(f"{path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if size == 0:
            raise SdloraError(f"{path} is empty (0 bytes): the download or copy did not finish")
        if head.startswith(b"version "):
            raise SdloraError(
                f"{path} is a git-lfs pointer, not the weights: run `git lfs pull` in its repo"
            )
        if len(head) < 8:
            raise SdloraError(f"{path} is truncated ({size} bytes): download it again")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100_000_000:
            raise SdloraError(
                f"{path} is not a safetensors file or is truncated (header of {n} bytes "
                f"in a file of {size}); download it again"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SdloraError(
                f"{path} has a corrupt safetensors header; download it again"
            ) from None
    metadata = header.pop("__metadata__", None) or {}
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + n + end > size:
        raise SdloraError(
            f"{path} is truncated: {size} bytes where the header describes {8 + n + end}; "
            "download it again"
        )
    return header, metadata


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a `.safetensors` file, or of a pickle only when allowed."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not path.is_file():
            raise SdloraError(f"{path} does not exist")
        if not allow_pickle:
            raise SdloraError(
                f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                ".safetensors, or pass --allow-pickle to load it with weights_only=True"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is reported by file
            raise SdloraError(
                f"{path} could not be loaded safely (weights_only=True): {e}"
            ) from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}
    _, metadata = read_safetensors_header(path)
    return load_file(str(path)), metadata


def read_lora(path: str | Path, allow_pickle: bool = False) -> Lora:
    """Read a kohya or diffusers/peft LoRA file into the canonical form."""
    path = Path(path)
    tensors, metadata = load_state_dict(path, allow_pickle)
    lora = lora_from_state_dict(tensors, metadata, source=str(path))
    from sdlora.families import detect_lora_family

    lora.family = detect_lora_family(lora).family
    return lora


def lora_from_state_dict(tensors: dict, metadata: dict[str, str], source: str = "LoRA") -> Lora:
    """The canonical form of a kohya or diffusers/peft state dict."""
    keys = list(tensors)
    for marker, kind in LYCORIS_MARKERS.items():
        if any(marker in k for k in keys):
            raise SdloraError(
                f"{source} is a {kind} file; sdlora reads plain LoRA files only for now"
            )
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return _from_kohya(tensors, metadata, source)
    if any(k.endswith(suffix) for k in keys for suffix in DIFFUSERS_SUFFIXES if suffix != ".alpha"):
        return _from_diffusers(tensors, metadata, source)
    if any(k.startswith(FULL_MODEL_MARKERS) or ".resnets." in k for k in keys):
        raise SdloraError(
            f"{source} is a full model checkpoint, not a LoRA; use it as the base "
            "(--base or model.base)"
        )
    raise SdloraError(
        f"{source} holds no LoRA tensors sdlora recognises (first keys: {', '.join(keys[:3])})"
    )


def _from_kohya(tensors: dict, metadata: dict, source: str) -> Lora:
    parts: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        for suffix, role in KOHYA_SUFFIXES.items():
            if key.endswith(suffix):
                split = split_kohya_name(key[: -len(suffix)])
                if split is None:
                    raise SdloraError(f"{source}: key {key!r} has no kohya prefix")
                parts.setdefault(split, {})[role] = tensor
                break
        else:
            raise SdloraError(f"{source}: unexpected key {key!r} in a kohya LoRA file")
    return _assemble(parts, {}, metadata, source, "kohya")


def _from_diffusers(tensors: dict, metadata: dict, source: str) -> Lora:
    parts: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in DIFFUSERS_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise SdloraError(f"{source}: unexpected key {key!r} in a diffusers LoRA file")
        component, path = _diffusers_path(key[: -len(suffix)])
        parts.setdefault((component, path), {})[DIFFUSERS_SUFFIXES[suffix]] = tensor
    configs = json.loads(metadata.get(METADATA_KEY, "{}") or "{}")
    return _assemble(parts, configs, metadata, source, "diffusers")


def _diffusers_path(name: str) -> tuple[str, str]:
    component = next((c for c in DIFFUSERS_COMPONENTS if name.startswith(c + ".")), "unet")
    path = name.removeprefix(component + ".").removeprefix("base_model.model.")
    path = path.removeprefix("text_model.")
    # Attention-processor LoRAs of older diffusers: `attn1.processor.to_q_lora` -> `attn1.to_q`.
    if m := re.match(r"(.*)\.processor\.(to_[qkv]|to_out)$", path):
        path = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
    return component, path


def _assemble(parts: dict, configs: dict, metadata: dict, source: str, file_format: str) -> Lora:
    lora = Lora(metadata=dict(metadata), file_format=file_format)
    for (component, path), roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "down" if "down" not in roles else "up"
            raise SdloraError(f"{source}: module {path} of {component} has no {missing} matrix")
        down, up = roles["down"], roles["up"]
        if "alpha" in roles:
            alpha = float(roles["alpha"].item())
        else:
            alpha = _configured_alpha(configs, component, path, rank=down.shape[0])
        lora.components.setdefault(component, {})[path] = LoraModule(down, up, alpha)
    return lora


def _configured_alpha(configs: dict, component: str, path: str, rank: int) -> float:
    """Alpha from diffusers' adapter metadata (peft's `alpha_pattern`, then `lora_alpha`);
    without metadata the scale is 1, i.e. alpha = rank."""
    for key, value in (configs.get(f"{component}.alpha_pattern") or {}).items():
        if path == key or path.endswith("." + key):
            return float(value)
    return float(configs.get(f"{component}.lora_alpha", rank))


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """Trigger words of a LoRA: ModelSpec's `trigger_phrase`, else the tags of sd-scripts'
    `ss_tag_frequency` that appear in every caption of their folder (where triggers sit)."""
    phrase = metadata.get("modelspec.trigger_phrase", "")
    words = [w.strip() for w in phrase.split(",") if w.strip()]
    if words:
        return words
    try:
        folders = json.loads(metadata.get("ss_tag_frequency", "{}") or "{}")
    except json.JSONDecodeError:
        return []
    images = {}
    try:
        images = {
            k: v.get("img_count")
            for k, v in json.loads(metadata.get("ss_dataset_dirs", "{}")).items()
        }
    except (json.JSONDecodeError, AttributeError):
        pass
    for folder, counts in folders.items():
        if not counts:
            continue
        top = images.get(folder) or max(counts.values())
        words += [tag for tag, n in counts.items() if n >= top and tag not in words]
    return words


def inspect_lora(path: str | Path, allow_pickle: bool = False) -> dict:
    """Everything worth knowing about a LoRA file, as `sdlora inspect --json` prints it."""
    from sdlora.families import FAMILIES, LABEL_KEY, detect_lora_family

    path = Path(path)
    lora = read_lora(path, allow_pickle)
    detection = detect_lora_family(lora)
    data = path.read_bytes()
    file_sha = hashlib.sha256(data).hexdigest()
    model_hash = lora.metadata.get("sshs_model_hash") or (
        sha256_after_header(data) if path.suffix.lower() == ".safetensors" else ""
    )
    family = detection.family
    prediction = lora.metadata.get("modelspec.prediction_type")
    if prediction is None and family:
        prediction = "v" if FAMILIES[family].prediction_type == "v_prediction" else "epsilon"
    return {
        "file": str(path),
        "format": lora.file_format,
        "family": family,
        "family_evidence": detection.evidence,
        "family_ambiguous": detection.ambiguous,
        "prediction_type": prediction,
        "base_label": lora.metadata.get(LABEL_KEY, ""),
        "ranks": sorted({m.rank for _, _, m in lora.modules()}),
        "alphas": sorted({m.alpha for _, _, m in lora.modules()}),
        "modules": {c: lora.count(c) for c in ("unet", "text_encoder", "text_encoder_2")},
        "trigger_words": trigger_words(lora.metadata),
        "hashes": {
            "sha256": file_sha,
            "autov2": file_sha[:10],
            "autov3": model_hash[:12],
            "sshs_model_hash": model_hash,
            "sshs_legacy_hash": lora.metadata.get("sshs_legacy_hash", ""),
        },
        "metadata": lora.metadata,
    }


def sha256_after_header(data: bytes) -> str:
    """sha256 of a safetensors file's tensor bytes (independent of its metadata): AutoV3."""
    header_len = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_len :]).hexdigest()
