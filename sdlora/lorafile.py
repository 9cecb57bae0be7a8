"""Reading LoRA files, ours or anyone's, into the canonical form (`sdlora.lora.Lora`).

Understood: kohya/Civitai files of LoRA, LoCon, LoHa, LoKr and DoRA (diffusers-layout and
SAI/LDM UNet names; `lora_te_`, `lora_te1_`, `lora_te2_`), diffusers/peft files (`unet.`/
`text_encoder.`/`text_encoder_2.` with `lora_A`/`lora_B`, and the older `lora.down`/
`lora_linear_layer`/attention-processor forms). Files that are something else get a message
saying what they are.

Other trainers' forms: LyCORIS's own `lycoris_` names (SimpleTuner's files: the UNet by diffusers
paths, see `sdlora.naming`), and the `lora_magnitude_vector` of peft/diffusers DoRA files.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from sdlora.algos import ALGOS, DORA_FILE_TENSORS, UNET_CONVS
from sdlora.errors import SdloraError
from sdlora.lora import Lora, LoraModule
from sdlora.naming import PREFIX_COMPONENTS, split_kohya_name
from sdlora.stfile import load_state_dict, sha256_after_header

LYCORIS_MARKERS = {
    "oft_blocks": "OFT (LyCORIS)",
    "oft_diag": "OFT (LyCORIS)",
    "on_input": "IA3 (LyCORIS)",
    ".a1.weight": "GLoRA (LyCORIS)",
    "lora_mid": "LoCon with CP decomposition (LyCORIS)",
}
# Key endings of LyCORIS algos whose names also occur inside other keys.
LYCORIS_ENDINGS = {".diff": "full-weight difference (LyCORIS `full`)"}
FULL_MODEL_MARKERS = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
    "conv_in.weight",
)
KOHYA_SUFFIXES = {
    **{suffix: role for algo in ALGOS.values() for suffix, role in algo.file_tensors.items()},
    **DORA_FILE_TENSORS,
}
# diffusers/peft key endings -> which matrix they hold.
DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # attention processors
    ".lora_magnitude_vector": "dora_scale",  # peft's DoRA: [out] (conv: [1, out, 1, 1])
    ".alpha": "alpha",
}  # fmt: skip
DIFFUSERS_COMPONENTS = ("unet", "text_encoder_2", "text_encoder")
METADATA_KEY = "lora_adapter_metadata"


def read_lora(path: str | Path, allow_pickle: bool = False, finite: bool = True) -> Lora:
    """Read a kohya or diffusers/peft LoRA file into the canonical form.

    With `finite` (for every use but inspecting it), a file holding NaN or infinity is refused.
    """
    path = Path(path)
    tensors, metadata = load_state_dict(path, allow_pickle)
    lora = lora_from_state_dict(tensors, metadata, source=str(path))
    if finite:
        require_finite(lora, str(path))
    from sdlora.families import detect_lora_family

    lora.family = detect_lora_family(lora).family
    return lora


def nonfinite_modules(lora: Lora, first_only: bool = False) -> list[str]:
    """`component:path` of the modules whose matrices or alpha hold NaN or infinity."""
    bad = []
    for component, path, m in lora.modules():
        tensors = m.tensors().values()
        if not (math.isfinite(m.alpha) and all(bool(t.isfinite().all()) for t in tensors)):
            bad.append(f"{component}:{path}")
            if first_only:
                break
    return bad


def require_finite(lora: Lora, source: str) -> None:
    """Refuse a LoRA holding NaN or infinity: applied, it turns every image into noise."""
    bad = nonfinite_modules(lora, first_only=True)
    if bad:
        raise SdloraError(
            f"{source} holds NaN or infinite values (first in module {bad[0]}); it cannot be "
            "used. `sdlora inspect` lists the modules; take an earlier file or checkpoint"
        )


def lora_from_state_dict(tensors: dict, metadata: dict[str, str], source: str = "LoRA") -> Lora:
    """The canonical form of a kohya or diffusers/peft state dict."""
    keys = list(tensors)
    found = [kind for marker, kind in LYCORIS_MARKERS.items() if any(marker in k for k in keys)]
    found += [kind for end, kind in LYCORIS_ENDINGS.items() if any(k.endswith(end) for k in keys)]
    if found:
        raise SdloraError(
            f"{source} is a {found[0]} file; sdlora reads LoRA, LoCon, LoHa, LoKr and DoRA "
            "files only"
        )
    if any(k.startswith(tuple(p + "_" for p in PREFIX_COMPONENTS)) for k in keys):
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
    try:
        configs = json.loads(metadata.get(METADATA_KEY, "{}") or "{}")
    except ValueError:
        configs = None
    if not isinstance(configs, dict):
        raise SdloraError(f"{source}: its {METADATA_KEY} metadata is not a JSON object")
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
    algos = {_module_algo(roles) for roles in parts.values()}
    if len(algos) > 1:
        titles = " and ".join(sorted(ALGOS[a].title for a in algos))
        raise SdloraError(f"{source} mixes {titles} modules; sdlora applies files of one algo")
    if algos != {"lora"} and any("dora_scale" in roles for roles in parts.values()):
        title = ALGOS[algos.pop()].title
        raise SdloraError(
            f"{source} is {title} with DoRA, which sdlora cannot apply (DoRA on LoRA/LoCon only)"
        )
    if len({"dora_scale" in roles for roles in parts.values()}) > 1:
        raise SdloraError(
            f"{source} has DoRA scales on some modules only; sdlora applies DoRA to all or none"
        )
    for (component, path), roles in parts.items():
        algo = _module_algo(roles)
        if algo != "lora":
            where = f"{source}: module {component}:{path}"
            module = _lycoris_module(roles, algo, where)
            lora.components.setdefault(component, {})[path] = module
            continue
        if "down" not in roles or "up" not in roles:
            missing = "down" if "down" not in roles else "up"
            raise SdloraError(f"{source}: module {path} of {component} has no {missing} matrix")
        down, up = roles["down"], roles["up"]
        _check_shapes(down, up, roles.get("alpha"), f"{source}: module {component}:{path}")
        if "alpha" in roles:
            alpha = float(roles["alpha"].item())
        else:
            alpha = _configured_alpha(configs, component, path, rank=down.shape[0], source=source)
        extra = {}
        if "dora_scale" in roles:
            where = f"{source}: {component}:{path}"
            extra["dora_scale"] = _dora_scale(roles["dora_scale"], up, where, file_format)
        lora.components.setdefault(component, {})[path] = LoraModule(down, up, alpha, extra)
    return lora


def _module_algo(roles: dict) -> str:
    """The module algo its tensors' roles name: LoHa's `hada_*`, LoKr's `lokr_*`, else LoRA."""
    for algo in ("loha", "lokr"):
        if any(role in ALGOS[algo].peft_tensors for role in roles):
            return algo
    return "lora"


def _lycoris_module(roles: dict, algo: str, where: str) -> LoraModule:
    """A LoHa or LoKr module from its tensors, refused unless they form ΔW (checked on shapes
    alone, on torch's meta device)."""
    title = ALGOS[algo].title
    tensors = {role: t for role, t in roles.items() if role != "alpha"}
    missing = [r for r in ALGOS[algo].required if r not in tensors]
    if algo == "lokr":
        for w in ("lokr_w1", "lokr_w2"):
            if w not in tensors and not {w + "_a", w + "_b"} <= set(tensors):
                missing.append(f"{w} (or {w}_a and {w}_b)")
    if missing:
        raise SdloraError(f"{where} is {title} without {', '.join(missing)}")
    if not all(t.is_floating_point() for t in tensors.values()):
        raise SdloraError(f"{where} holds {title} tensors that are not floating point")
    alpha = roles.get("alpha")
    if alpha is not None and (alpha.numel() != 1 or alpha.is_complex()):
        raise SdloraError(f"{where}: alpha has shape {list(alpha.shape)}; a number is expected")
    module = LoraModule(None, None, 1.0, tensors, algo)
    try:
        shape = module.shape
    except (RuntimeError, IndexError, ValueError):
        shapes = ", ".join(f"{r} {list(t.shape)}" for r, t in tensors.items())
        raise SdloraError(f"{where}: its {title} tensors do not fit together ({shapes})") from None
    if len(shape) not in (2, 4) or 0 in shape:
        raise SdloraError(f"{where}: its {title} update has no layer's shape ({list(shape)})")
    # Without alpha the update is unscaled (LyCORIS takes alpha = rank then).
    module.alpha = float(alpha.item()) if alpha is not None else float(module.rank or 1)
    return module


def _check_shapes(down, up, alpha, where: str) -> None:
    """Refuse a module whose matrices cannot form ΔW = up @ down (or whose alpha is no scalar)."""
    shapes = f"down {list(down.shape)}, up {list(up.shape)}"
    if not (down.is_floating_point() and up.is_floating_point()):
        raise SdloraError(f"{where} holds {down.dtype}/{up.dtype} matrices, not floating point")
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or 0 in (*down.shape, *up.shape):
        raise SdloraError(f"{where} has matrices of no LoRA's shape ({shapes})")
    if up.shape[1] != down.shape[0]:
        raise SdloraError(f"{where}: down and up disagree on the rank ({shapes})")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise SdloraError(f"{where}: the up matrix of a conv LoRA must be 1x1 ({shapes})")
    if alpha is not None and (alpha.numel() != 1 or alpha.is_complex()):
        raise SdloraError(
            f"{where}: alpha has shape {list(alpha.shape)}; a single number is expected"
        )


def _dora_scale(scale, up, where: str, file_format: str):
    """DoRA's magnitude on the output axis ([out, 1] or [out, 1, 1, 1] in a kohya file, peft's
    shapes in a diffusers one, see `sdlora.algos`); LyCORIS's default input-axis form [1, in]
    is refused by name."""
    out = up.shape[0]
    axis_ok = file_format == "diffusers" or scale.shape[0] == out
    if not scale.is_floating_point() or scale.numel() != out or not axis_ok:
        raise SdloraError(
            f"{where}: dora_scale has shape {list(scale.shape)}; sdlora applies DoRA on the "
            f"output axis only ([{out}, 1]), not LyCORIS's input-axis form"
        )
    return scale.reshape(out, *[1] * (up.dim() - 1))


def _configured_alpha(configs: dict, component: str, path: str, rank: int, source: str) -> float:
    """Alpha from diffusers' adapter metadata (peft's `alpha_pattern`, then `lora_alpha`);
    without metadata the scale is 1, i.e. alpha = rank."""
    patterns = configs.get(f"{component}.alpha_pattern") or {}
    value = configs.get(f"{component}.lora_alpha", rank)
    if isinstance(patterns, dict):
        value = next((v for k, v in patterns.items() if path == k or path.endswith("." + k)), value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SdloraError(f"{source}: the alpha of {component}:{path} in its metadata is {value!r}")
    return float(value)


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """Trigger words of a LoRA: ModelSpec's `trigger_phrase`, else the tags of sd-scripts'
    `ss_tag_frequency` that appear in every caption of their folder (where triggers sit)."""
    phrase = metadata.get("modelspec.trigger_phrase", "")
    words = [w.strip() for w in phrase.split(",") if w.strip()]
    if words:
        return words
    folders = _json_object(metadata.get("ss_tag_frequency"))
    images = {
        k: v.get("img_count")
        for k, v in _json_object(metadata.get("ss_dataset_dirs")).items()
        if isinstance(v, dict)
    }
    for folder, counts in folders.items():
        if not isinstance(counts, dict):
            continue
        counts = {t: n for t, n in counts.items() if isinstance(n, (int, float))}
        if not counts:
            continue
        top = images.get(folder)
        top = top if isinstance(top, (int, float)) and top else max(counts.values())
        words += [tag for tag, n in counts.items() if n >= top and tag not in words]
    return words


def _json_object(text: str | None) -> dict:
    """A metadata value holding a JSON object, or {} when it holds anything else."""
    try:
        value = json.loads(text or "{}")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def inspect_lora(path: str | Path, allow_pickle: bool = False) -> dict:
    """Everything worth knowing about a LoRA file, as `sdlora inspect --json` prints it."""
    from sdlora.families import FAMILIES, LABEL_KEY, detect_lora_family

    path = Path(path)
    lora = read_lora(path, allow_pickle, finite=False)
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
        "algo": adapter_algo(lora),
        "dora": any(m.dora for _, _, m in lora.modules()),
        "ranks": sorted({m.rank for _, _, m in lora.modules()} - {None}),
        "alphas": _alphas(lora),
        "non_finite_modules": nonfinite_modules(lora),
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


def adapter_algo(lora: Lora) -> str:
    """`loha` or `lokr` by their modules, `locon` when convolutions are adapted (the ResNet and
    resampler convs, or any wider than 1x1), else `lora`. DoRA is a flag beside it."""
    modules = list(lora.modules())
    algo = next((m.algo for _, _, m in modules if m.algo != "lora"), "lora")
    if algo != "lora":
        return algo
    for _, path, m in modules:
        wide = m.down.dim() == 4 and tuple(m.down.shape[2:]) != (1, 1)
        if wide or path.rsplit(".", 1)[-1] in UNET_CONVS:
            return "locon"
    return "lora"


def _alphas(lora: Lora) -> list:
    """The distinct alphas, NaN and infinity as text (JSON has no numbers for them)."""
    alphas = {m.alpha for _, _, m in lora.modules()}
    finite = sorted(a for a in alphas if math.isfinite(a))
    return finite + sorted({str(a) for a in alphas if not math.isfinite(a)})
