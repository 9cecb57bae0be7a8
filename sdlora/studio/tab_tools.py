"""The Generate and Export screens: a base with LoRAs rendered as `sdlora generate` does (the
guard's refusal shown in words, trigger words put in), and `sdlora inspect` / `export`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from sdlora.errors import SdloraError

_cache: dict[tuple, object] = {}
_lock = threading.Lock()  # one generation at a time: the pipeline's adapters are shared


def lora_specs(text: str) -> list:
    """One `FILE` or `FILE:WEIGHT` per line, as `--lora` takes them."""
    from sdlora.prompts import LoraSpec

    return [LoraSpec.parse(line.strip()) for line in text.splitlines() if line.strip()]


def generator_for(base: str, loras: list):
    """A loaded Generator for this base and these LoRA files (the last one is kept)."""
    from sdlora.generate import Generator

    key = (base, tuple((str(s.path), s.path.stat().st_mtime if s.path.exists() else 0)
                       for s in loras))  # fmt: skip
    if key in _cache:
        generator = _cache[key]
        generator.set_scales([s.scale for s in loras])
        return generator
    generator = Generator.load(base, loras, fuse=False, device="auto", dtype="auto")
    _cache.clear()
    _cache[key] = generator
    return generator


def render(base, lora_text, prompt, negative, seed, steps, sampler, cfg, width, height, out_dir):
    """Images saved with their infotext as `sdlora generate` saves them; (paths, notes)."""
    from sdlora.generate import check_sampler
    from sdlora.prompts import save_images, with_triggers

    check_sampler(sampler)
    loras = lora_specs(lora_text)
    with _lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = generator_for(base.strip(), loras)
        prompt = with_triggers(prompt, generator.loras, "auto")
        images = generator.render(prompt, negative=negative, steps=int(steps), cfg=float(cfg),
                                  seed=int(seed), size=(int(width), int(height)),
                                  sampler=sampler)  # fmt: skip
    notes = [str(w.message) for w in caught]
    return save_images(images, out_dir), notes


def ab_images(base, lora_text, prompt, seed, steps, sampler, cfg, width, height):
    """Base vs LoRA, without and with the trigger: four images from one seed."""
    from sdlora.grids import grid_images

    loras = lora_specs(lora_text)
    if not loras:
        raise SdloraError("add a LoRA for the A/B")
    render_args = dict(steps=int(steps), cfg=float(cfg), seed=int(seed),
                       size=(int(width), int(height)), sampler=sampler)  # fmt: skip
    out = []
    with _lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generator = generator_for(base.strip(), loras)
        for label, scale in (("base", 0.0), ("LoRA", None)):
            generator.set_scales([scale if scale is not None else s.scale for s in loras])
            images, labels = grid_images(generator, "trigger", ["off", "on"], prompt, **render_args)
            out += [(im, f"{label}, {lab}") for im, lab in zip(images, labels, strict=True)]
        generator.set_scales([s.scale for s in loras])
    return out


def known_loras(workspace: Path) -> list[str]:
    return sorted(str(p) for p in (workspace / "runs").glob("*/*.safetensors"))


def build_generate(workspace: Path) -> None:
    import gradio as gr

    from sdlora.generate import SAMPLERS
    from sdlora.studio.tab_train import BUILTIN_BASES

    out_dir = workspace / "images"
    with gr.Row():
        base = gr.Dropdown(BUILTIN_BASES, value="tiny:sd1", allow_custom_value=True,
                           label="Base model", elem_id="g-base")  # fmt: skip
        found = gr.Dropdown(label="Add a LoRA from the workspace", choices=[], elem_id="g-found")
    loras = gr.Textbox(label="LoRAs (one per line: FILE or FILE:WEIGHT)", lines=2,
                       elem_id="g-loras")  # fmt: skip
    prompt = gr.Textbox(label="Prompt (the LoRAs' trigger words are added when missing)",
                        value="a circle", elem_id="g-prompt")  # fmt: skip
    negative = gr.Textbox(label="Negative prompt", elem_id="g-negative")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, elem_id="g-seed")
        steps = gr.Number(20, label="Steps", precision=0, elem_id="g-steps")
        sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", elem_id="g-sampler")
        cfg = gr.Number(7.5, label="Guidance", elem_id="g-cfg")
        width = gr.Number(512, label="Width", precision=0, elem_id="g-width")
        height = gr.Number(512, label="Height", precision=0, elem_id="g-height")
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id="g-run")
        ab = gr.Button("A/B: base vs LoRA, with/without trigger", elem_id="g-ab")
    message = gr.Markdown(elem_id="g-message")
    gallery = gr.Gallery(label="Images", columns=4, elem_id="g-images", height=300)
    info = gr.Textbox(label="Infotext (A1111 parameters, also inside each PNG)", lines=3,
                      elem_id="g-info")  # fmt: skip

    def refresh_found():
        return gr.update(choices=known_loras(workspace))

    found.focus(refresh_found, None, found)

    def add_found(current, path):
        lines = [line for line in current.splitlines() if line.strip()]
        return "\n".join(lines + [f"{path}:1.0"]) if path else current

    found.input(add_found, [loras, found], loras)
    args = [base, loras, prompt, negative, seed, steps, sampler, cfg, width, height]

    def do_generate(*values):
        try:
            paths, notes = render(*values, out_dir)
        except SdloraError as e:
            return f"<span class='refusal'>Refused: {e}</span>", gr.skip(), ""
        from PIL import Image

        text = "\n\n".join(Image.open(p).info.get("parameters", "") for p in paths)
        saved = ", ".join(str(p) for p in paths)
        extra = "".join(f"\n- note: {n}" for n in notes)
        return f"saved {saved}{extra}", [str(p) for p in paths], text

    run.click(do_generate, args, [message, gallery, info])

    def do_ab(b, lo, p, _neg, s, st, sa, c, w, h):
        try:
            cells = ab_images(b, lo, p, s, st, sa, c, w, h)
        except SdloraError as e:
            return f"<span class='refusal'>Refused: {e}</span>", gr.skip()
        return "A/B from one seed: base and LoRA, each without and with the trigger", cells

    ab.click(do_ab, args, [message, gallery])


def run_cli(args: list[str]) -> tuple[int, str]:
    """Run an `sdlora` command as the CLI does, in a child process: (exit code, its output)."""
    done = subprocess.run([sys.executable, "-m", "sdlora", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    return done.returncode, (done.stdout + done.stderr).strip()


def build_export(workspace: Path) -> None:
    import gradio as gr

    from sdlora.lorafile import inspect_lora

    out_dir = workspace / "exports"
    with gr.Row():
        file = gr.Textbox(label="LoRA file", elem_id="e-file", scale=4)
        inspect = gr.Button("Inspect", elem_id="e-inspect")
    summary = gr.Markdown(elem_id="e-summary")
    details = gr.JSON(label="Everything `sdlora inspect --json` shows", elem_id="e-json")
    with gr.Row():
        fmt = gr.Radio(["kohya", "diffusers"], value="diffusers", label="Convert to",
                       elem_id="e-format")  # fmt: skip
        dtype = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="Precision")
        convert = gr.Button("Convert", elem_id="e-convert")
    converted = gr.Markdown(elem_id="e-converted")
    download = gr.File(label="Converted file", elem_id="e-download")

    def do_inspect(path):
        try:
            info = inspect_lora(Path(path.strip()))
        except (SdloraError, OSError) as e:
            return f"**error:** {e}", None
        modules = ", ".join(f"{c} {n}" for c, n in info["modules"].items() if n)
        text = (
            f"**{info['family'] or 'unknown family'}** · {info['format']} · rank "
            f"{info['ranks']} · alpha {info['alphas']} · modules: {modules} · triggers: "
            f"{', '.join(info['trigger_words']) or '-'} · AutoV2 {info['hashes']['autov2']}"
        )
        return text, json.loads(json.dumps(info, default=str))

    inspect.click(do_inspect, file, [summary, details])
    file.submit(do_inspect, file, [summary, details])

    def do_convert(path, target, precision):
        source = Path(path.strip())
        out = out_dir / f"{source.stem}-{target}.safetensors"
        out_dir.mkdir(parents=True, exist_ok=True)
        args = ["export", str(source), "--format", target, "-o", str(out), "--dtype", precision]
        code, output = run_cli([*args, "--overwrite"])
        if code != 0:
            return f"**error:** {output.splitlines()[-1] if output else code}", None
        return f"wrote {out}", str(out)

    convert.click(do_convert, [file, fmt, dtype], [converted, download])

    # The share bundle: `sdlora bundle` in a child process (it draws preview images).
    with gr.Row():
        preview_base = gr.Textbox(label="Base for the previews (empty: the LoRA's own, or none)",
                                  elem_id="e-bundle-base", scale=4)  # fmt: skip
        bundle = gr.Button("Write bundle for Civitai / the Hub", elem_id="e-bundle")
    bundled = gr.Markdown(elem_id="e-bundled")

    def do_bundle(path, base):
        source = Path(path.strip())
        out = workspace / "bundles" / source.stem
        args = ["bundle", str(source), "-o", str(out), "--overwrite"]
        code, output = run_cli([*args, *(["--base", base.strip()] if base.strip() else [])])
        if code != 0:
            return f"**error:** {output.splitlines()[-1] if output else code}"
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        return f"wrote {out}: " + ", ".join(files)

    bundle.click(do_bundle, [file, preview_base], bundled)
