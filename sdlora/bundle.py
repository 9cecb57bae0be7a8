"""A publishable folder for a trained LoRA: what Civitai's upload form and the Hugging Face Hub
ask for, filled in from the run.

`write_bundle` makes, from a run folder (or a lone LoRA file):

    <name>.safetensors               the LoRA, kohya format, fp16 (A1111, ComfyUI, Forge, Civitai)
    diffusers/pytorch_lora_weights.safetensors   the diffusers/peft form (`load_lora_weights`;
                                     LoRA, LoCon and DoRA: diffusers reads no LoHa/LoKr)
    previews/NN_base.png, NN_lora.png            the run's sample prompts with the trigger, fixed
                                     seeds, base vs LoRA; A1111 generation data in each PNG
    README.md                        Hugging Face model card (YAML front matter + Markdown)
    civitai.json                     the fields of Civitai's upload form
    ab_grid.png, loss.png            the run's A/B grid and loss curve, when the run has them
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import tomllib
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.families import BASE_LABELS, FAMILIES, FAMILY_LABELS, LABEL_KEY, known_label
from sdlora.lorafile import read_lora, trigger_words
from sdlora.stfile import sha256_after_header

DIFFUSERS_FILE = "diffusers/pytorch_lora_weights.safetensors"
MAX_PREVIEWS = 4
# The license people publish under by default: the base model's own (its terms pass on).
BASE_LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sd2-v": "openrail++",
                 "sdxl": "openrail++"}  # fmt: skip
# The reference checkpoint of each family on the Hub, for the card's `base_model`.
HUB_BASES = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1-base",
    "sd2-v": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
COPIED = ("ab_grid.png", "loss.png")


def write_bundle(
    source: str | Path,
    out: str | Path | None = None,
    *,
    license: str | None = None,
    base: str | None = None,
    weight: float = 1.0,
    previews: bool = True,
    overwrite: bool = False,
    device: str = "auto",
) -> Path:
    """Write the bundle of `source` (a run folder or a LoRA file) to `out` (default: the run's
    `bundle/`, or `<lora>-bundle/` beside a lone file) and return its path.

    `base` overrides the base the previews are drawn with (the run's `model.base`, else the
    LoRA's `ss_sd_model_name` when that can be loaded here); without one, no previews.
    The folder appears whole or not at all; an existing one is replaced only with `overwrite`.
    """
    lora_path, run_dir = _locate(Path(source))
    out = Path(out) if out else (run_dir / "bundle" if run_dir else _beside(lora_path))
    if out.exists() and not overwrite:
        raise SdloraError(f"{out} already exists; pass --overwrite or choose another -o")
    run = _read_run(run_dir)
    lora = read_lora(lora_path)
    family = lora.family
    if family is None:
        raise SdloraError(f"the family of {lora_path} cannot be told; it cannot be bundled")
    label = run["base_label"] or lora.metadata.get(LABEL_KEY, "")
    metadata = {
        k: v for k, v in lora.metadata.items() if not k.startswith(("sshs_", "lora_adapter"))
    }
    metadata.pop("modelspec.hash_sha256", None)
    if label:
        metadata[LABEL_KEY] = known_label(label) or label
    name = clean_name(metadata.get("ss_output_name") or lora_path.stem)
    triggers = trigger_words(lora.metadata) or ([run["trigger"]] if run["trigger"] else [])
    base = base or run["base"] or _loadable(metadata.get("ss_sd_model_name", ""))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the published folder
    try:
        from sdlora.export import save_lora

        kohya = save_lora(tmp / f"{name}.safetensors", lora, family, "kohya", metadata, "fp16")
        diffusers = all(m.algo == "lora" for _, _, m in lora.modules())
        if diffusers:
            save_lora(tmp / DIFFUSERS_FILE, lora, family, "diffusers", metadata, "fp16")
        shown = []
        if previews and base:
            prompts = preview_prompts(run["prompts"], triggers)
            shown = render_previews(base, kohya, prompts, tmp / "previews", weight=weight,
                                    steps=run["steps"], cfg=run["cfg"], seed=run["seed"],
                                    device=device)  # fmt: skip
        for figure in COPIED if run_dir else ():
            if (run_dir / figure).is_file():
                shutil.copy(run_dir / figure, tmp / figure)
        card = {
            "name": name, "family": family,
            "label": "Other" if _builtin(base) else civitai_base_model(family, label),
            "triggers": triggers, "weight": weight, "metadata": metadata, "base": base,
            "report": run["report"], "previews": shown,
            "license": license or BASE_LICENSES[family],
            "figures": [f for f in COPIED if (tmp / f).is_file()], "diffusers": diffusers,
        }  # fmt: skip
        (tmp / "README.md").write_text(model_card(**card), encoding="utf-8")
        civitai = civitai_fields(kohya, lora, card)
        (tmp / "civitai.json").write_text(json.dumps(civitai, indent=2, ensure_ascii=False))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def clean_name(text: str) -> str:
    """A file name every site and OS takes: letters, digits, `-`, `_` and `.` only."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._-")
    return name or "lora"


def preview_prompts(prompts: list[str], triggers: list[str]) -> list[str]:
    """The run's sample prompts, each with the trigger words first (where missing), deduplicated,
    at most MAX_PREVIEWS."""
    trigger = ", ".join(triggers)
    out: list[str] = []
    for prompt in prompts or ["{trigger}"]:
        prompt = prompt.replace("{trigger}", trigger).strip(" ,")
        if trigger and not all(t in prompt for t in triggers):
            prompt = f"{trigger}, {prompt}" if prompt else trigger
        if prompt and prompt not in out:
            out.append(prompt)
    return out[:MAX_PREVIEWS]


def render_previews(
    base: str, lora_path: Path, prompts: list[str], folder: Path, *, weight: float, steps: int,
    cfg: float, seed: int, device: str = "auto",
) -> list[dict]:  # fmt: skip
    """Draw each prompt with seed `seed + i` by the base alone and with the LoRA at `weight`;
    each PNG carries the infotext generate writes (prompt with `<lora:name:weight>`)."""
    from sdlora.generate import Generator
    from sdlora.images import save_png
    from sdlora.lorafile import read_lora
    from sdlora.models import load_base
    from sdlora.prompts import LoraSpec
    from sdlora.schedule import prediction_from_metadata, zero_snr_from_metadata

    # The LoRA's metadata says how its base was trained (v-prediction, zero terminal SNR):
    # the base alone is drawn that way too, or its previews could be black.
    metadata = read_lora(lora_path).metadata
    prediction = prediction_from_metadata(metadata)
    zero_snr = prediction == "v_prediction" and zero_snr_from_metadata(metadata)
    model = load_base(base, prediction_type=prediction, zero_terminal_snr=zero_snr)
    plain = Generator.load(model, [], device=device)
    drawn = {"base": [plain.render(p, steps=steps, cfg=cfg, seed=seed + i)[0]
                      for i, p in enumerate(prompts)]}  # fmt: skip
    spec = LoraSpec(lora_path, weight)
    styled = Generator.load(model, [spec], device=device)
    drawn["lora"] = [styled.render(p, steps=steps, cfg=cfg, seed=seed + i)[0]
                     for i, p in enumerate(prompts)]  # fmt: skip
    shown = []
    for i, prompt in enumerate(prompts):
        for kind, images in drawn.items():
            info = images[i].info["parameters"]
            tag = f"<lora:{spec.name}:{weight:g}>"
            if kind == "lora" and "<lora:" not in info.split("\n", 1)[0]:
                info = info.replace(prompt, f"{prompt} {tag}", 1)  # A1111 keeps the tag
            path = save_png(images[i], folder / f"{i + 1:02d}_{kind}.png", {"parameters": info})
            shown.append({"file": f"previews/{path.name}", "kind": kind, "prompt": prompt,
                          "seed": seed + i, "parameters": info})  # fmt: skip
    return shown


def civitai_base_model(family: str, label: str = "") -> str:
    """Civitai's name of the base: the label where Civitai knows it, else the family's."""
    known = known_label(label) if label else None
    if known and BASE_LABELS[known] in (family, family.removesuffix("-v")):
        return known
    return FAMILY_LABELS[family]


def file_hashes(path: Path) -> dict[str, str]:
    """The hashes Civitai lists: AutoV2 (first 10 hex of the file's sha256), SHA256, and
    AutoV3 (sha256 of the tensor bytes, A1111's `Lora hashes`)."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return {"AutoV2": sha[:10].upper(), "SHA256": sha.upper(),
            "AutoV3": sha256_after_header(data)[:12].upper()}  # fmt: skip


def civitai_fields(kohya: Path, lora, card: dict) -> dict:
    """Civitai's upload form as JSON: model type, version, file and images."""
    # Civitai files LyCORIS algos (LoHa, LoKr) under LoCon too.
    modules = [m for _, _, m in lora.modules()]
    conv = any(m.algo != "lora" or (m.down.dim() == 4 and m.down.shape[-1] > 1) for m in modules)
    return {
        "name": card["name"],
        "type": "LoCon" if conv else "LORA",
        "baseModel": card["label"],  # "Other": a built-in demo model
        "trainedWords": card["triggers"],
        "recommendedWeight": card["weight"],
        "description": _description(card),
        "files": [
            {
                "name": kohya.name,
                "type": "Model",
                "metadata": {"format": "SafeTensor", "fp": "fp16"},
                "sizeKB": round(kohya.stat().st_size / 1024, 1),
                "hashes": file_hashes(kohya),
            }
        ],  # fmt: skip
        "images": [
            {"file": p["file"], "parameters": p["parameters"]}
            for p in card["previews"]
            if p["kind"] == "lora"
        ],  # fmt: skip
    }


def model_card(
    *,
    name,
    family,
    label,
    triggers,
    weight,
    metadata,
    base,
    report,
    previews,
    license,
    figures,
    diffusers=True,
) -> str:
    """The Hub model card: YAML front matter (read by the Hub) and a Markdown body."""
    from huggingface_hub import ModelCardData

    # A LoRA of a built-in test/demo model works on no published base.
    hub_base = None if _builtin(base) else base if _is_hub_id(base) else HUB_BASES[family]
    tags = ["text-to-image", "lora", "template:sd-lora", "sdlora",
            "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion"]  # fmt: skip
    if label not in (*FAMILY_LABELS.values(), "Other"):
        tags.append(label.lower())
    widget = [
        {"text": p["prompt"], "output": {"url": p["file"]}} for p in previews if p["kind"] == "lora"
    ]
    data = ModelCardData(
        base_model=hub_base, license=license, tags=tags, instance_prompt=", ".join(triggers),
        widget=widget or None,
    )  # fmt: skip
    body = [f"# {name}", "", _description({"base": base, "label": label, "triggers": triggers,
                                          "weight": weight, "family": family})]  # fmt: skip
    body += ["", "## Use it", "", *_usage(name, triggers, weight, hub_base, diffusers)]
    body += ["", "## Training", "", *_settings(metadata)]
    if report:
        body += ["", "## Learning report", "", *_report(report)]
    if "ab_grid.png" in figures:
        body += ["", "Base vs LoRA, without / with the trigger:", "", "![A/B grid](ab_grid.png)"]
    if previews:
        body += ["", "## Previews", "", "| base | with the LoRA |", "|---|---|"]
        pairs = {}
        for p in previews:
            pairs.setdefault(p["prompt"], {})[p["kind"]] = p["file"]
        for prompt, files in pairs.items():
            body.append(f"| ![{prompt}]({files['base']}) | ![{prompt}]({files['lora']}) |")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def _description(card: dict) -> str:
    words = ", ".join(f"`{t}`" for t in card["triggers"]) or "none"
    base = (
        f"sdlora's built-in {card['base']} model (a demo: it works on no published base)"
        if _builtin(card["base"])
        else f"{card['label']} ({FAMILIES[card['family']].title})"
    )
    return (
        f"A style LoRA for {base}, trained with sdlora. Trigger words: {words}. "
        f"Recommended weight: {card['weight']:g}."
    )


def _usage(
    name: str, triggers: list[str], weight: float, hub_base: str, diffusers: bool
) -> list[str]:
    trigger = ", ".join(triggers)
    folder = Path(DIFFUSERS_FILE).parent
    lines = [
        f"- A1111 / Forge: put `{name}.safetensors` in `models/Lora`, then prompt "
        f"`{trigger}, ... <lora:{name}:{weight:g}>`",
        f"- ComfyUI: put it in `models/loras`; a LoraLoader node with `{name}.safetensors`, "
        f"strength {weight:g}, and `{trigger}` in the prompt",
    ]
    if diffusers:
        lines.append(
            f"- diffusers, on `{hub_base or 'the base'}`: "
            f'`pipe.load_lora_weights("<this repo id or folder>", subfolder="{folder}")`'
        )
    return lines


def _settings(meta: dict[str, str]) -> list[str]:
    rows = [("base", meta.get("ss_sd_model_name")), ("rank / alpha",
            f"{meta.get('ss_network_dim', '?')} / {meta.get('ss_network_alpha', '?')}"),
            ("steps", meta.get("ss_steps")), ("images", meta.get("ss_num_train_images")),
            ("batch size", meta.get("ss_batch_size_per_device")),
            ("resolution", meta.get("modelspec.resolution")),
            ("learning rate (UNet / text encoder)",
             f"{meta.get('ss_unet_lr', '?')} / {meta.get('ss_text_encoder_lr', '?')}"),
            ("optimizer", meta.get("ss_optimizer")),
            ("mixed precision", meta.get("ss_mixed_precision"))]  # fmt: skip
    return [f"- {k}: {v}" for k, v in rows if v]


def _report(report: dict) -> list[str]:
    keys = ("style_shift_with_trigger", "drift_without_trigger", "redrawn_without_trigger",
            "change_without_trigger")  # fmt: skip
    lines = [f"- {k.replace('_', ' ')}: {report[k]}" for k in keys if k in report]
    return lines + [f"- ({report.get('statistic', '')}; {report.get('scale', '')})"]


def _locate(source: Path) -> tuple[Path, Path | None]:
    """(LoRA file, run folder or None) of a run folder or a LoRA file."""
    if source.is_file():
        return source, None
    config = source / "config.toml"
    if not config.is_file():
        raise SdloraError(
            f"{source} is neither a LoRA file nor a run folder (no config.toml); pass the "
            "folder `sdlora train` wrote, or the .safetensors file"
        )
    name = tomllib.loads(config.read_text()).get("output", {}).get("name", "style")
    lora = source / f"{name}.safetensors"
    if not lora.is_file():
        raise SdloraError(f"{source} has no {lora.name}: the run has not finished its LoRA")
    return lora, source


def _read_run(run_dir: Path | None) -> dict:
    """What a bundle takes from a run folder: base, label, trigger, sample settings, report."""
    raw = tomllib.loads((run_dir / "config.toml").read_text()) if run_dir else {}
    model, sample = raw.get("model", {}), raw.get("sample", {})
    report = run_dir / "learning_report.json" if run_dir else None
    return {
        "base": model.get("base"), "base_label": model.get("base_label", ""),
        "trigger": raw.get("dataset", {}).get("trigger", ""),
        "prompts": list(sample.get("prompts", ["{trigger}"])),
        "steps": sample.get("steps", 20), "cfg": sample.get("cfg", 7.5),
        "seed": sample.get("seed", 0),
        "report": json.loads(report.read_text()) if report and report.is_file() else None,
    }  # fmt: skip


def _loadable(name: str) -> str | None:
    """A base named in a LoRA's metadata, if it can be loaded here (built in or a local path)."""
    if name.startswith(("tiny:", "random:")) or name == "micro" or (name and Path(name).exists()):
        return name
    return None


def _builtin(base: str | None) -> bool:
    return bool(base) and (base == "micro" or base.startswith(("tiny:", "random:")))


def _is_hub_id(spec: str | None) -> bool:
    parts = (spec or "").split("/")
    return len(parts) == 2 and all(parts) and not Path(spec).exists()


def _beside(lora_path: Path) -> Path:
    return lora_path.with_name(f"{lora_path.stem}-bundle")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one goes only once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
