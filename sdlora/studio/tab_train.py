"""The Train screen: base (family shown), preset, trigger and the common knobs, the full TOML
in an editor kept in sync both ways, the estimate, and Queue."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.studio import runs
from sdlora.studio.jobs import JobQueue

BUILTIN_BASES = ["tiny:sd1", "tiny:sd2", "tiny:sd2-v", "tiny:sdxl", "micro"]
# form field -> (section, key)
KNOBS = {
    "base": ("model", "base"),
    "dataset": ("dataset", "path"),
    "trigger": ("dataset", "trigger"),
    "resolution": ("dataset", "resolution"),
    "steps": ("train", "steps"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "rank": ("lora", "rank"),
    "alpha": ("lora", "alpha"),
    "save_every": ("train", "save_every"),
    "sample_every": ("sample", "every"),
    "sample_steps": ("sample", "steps"),
    "name": ("output", "name"),
}
INTS = {"resolution", "steps", "batch_size", "rank", "save_every", "sample_every", "sample_steps"}


def presets_folder() -> Path:
    from sdlora.cli import examples_root

    return examples_root() / "configs"


def preset_names() -> list[str]:
    return ["defaults"] + sorted(p.stem for p in presets_folder().glob("*.toml"))


def example_dataset() -> Path:
    from sdlora.cli import examples_root

    return examples_root() / "datasets_examples" / "stripes"


def family_text(base: str) -> str:
    """The family of `base`, read without loading its weights, or why it cannot be."""
    from sdlora.families import FAMILIES
    from sdlora.models import base_family

    if not base.strip():
        return "family: pick a base"
    try:
        family = base_family(base.strip())
    except SdloraError as e:
        return f"**family: unknown** — {e}"
    return f"family: **{family}** ({FAMILIES[family].title})"


def device_choices() -> list[tuple[str, str]]:
    """(label, value) of each place a job can run: as the config says, the CPU, each GPU."""
    import torch

    gpus = [(f"cuda:{i} ({torch.cuda.get_device_name(i)})", f"cuda:{i}")
            for i in range(runs.gpu_count())]  # fmt: skip
    return [("as train.device says (auto: a free GPU, else CPU)", ""), ("cpu", "cpu"), *gpus]


def build(workspace: Path, queue: JobQueue) -> None:
    import gradio as gr

    with gr.Row():
        base = gr.Dropdown(BUILTIN_BASES, value="tiny:sd1", allow_custom_value=True,
                           label="Base model (built-in, diffusers folder or file)",
                           elem_id="tr-base", scale=3)  # fmt: skip
        family = gr.Markdown(family_text("tiny:sd1"), elem_id="tr-family")
        preset = gr.Dropdown(preset_names(), value="defaults", label="Preset", elem_id="tr-preset")
    with gr.Row():
        dataset = gr.Textbox(str(example_dataset()), label="Dataset folder", elem_id="tr-dataset",
                             scale=3)  # fmt: skip
        trigger = gr.Textbox(label="Trigger word", value="zkstyle", elem_id="tr-trigger")
        name = gr.Textbox(label="Run name", value="style", elem_id="tr-name")
    with gr.Row():
        resolution = gr.Number(512, label="Resolution", precision=0, elem_id="tr-resolution")
        steps = gr.Number(1000, label="Steps", precision=0, elem_id="tr-steps")
        batch_size = gr.Number(1, label="Batch size", precision=0, elem_id="tr-batch")
        lr = gr.Number(1e-4, label="Learning rate", elem_id="tr-lr")
        rank = gr.Number(16, label="Rank", precision=0, elem_id="tr-rank")
        alpha = gr.Number(16.0, label="Alpha", elem_id="tr-alpha")
    with gr.Row():
        save_every = gr.Number(0, label="Checkpoint every (0: last step only)", precision=0,
                               elem_id="tr-save-every")  # fmt: skip
        sample_every = gr.Number(0, label="Sample every (0: start and end)", precision=0,
                                 elem_id="tr-sample-every")  # fmt: skip
        sample_steps = gr.Number(20, label="Sample steps", precision=0, elem_id="tr-sample-steps")
        device = gr.Dropdown(device_choices(), value="", label="Run on", elem_id="tr-device")
    fields = dict(base=base, dataset=dataset, trigger=trigger, resolution=resolution, steps=steps,
                  batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, save_every=save_every,
                  sample_every=sample_every, sample_steps=sample_steps, name=name)  # fmt: skip
    order = list(fields)
    toml = gr.Code(label="Config (TOML; edits here update the form)", language=None,
                   lines=18, elem_id="tr-toml", interactive=True)  # fmt: skip
    initial = [preset.value, *(component.value for component in fields.values())]
    error = gr.Markdown(elem_id="tr-error")
    with gr.Row():
        estimate_button = gr.Button("Estimate", elem_id="tr-estimate-button")
        queue_button = gr.Button("Queue training", variant="primary", elem_id="tr-queue")
    estimate = gr.Markdown(elem_id="tr-estimate")
    status = gr.Markdown(elem_id="tr-status")

    def form_to_toml(preset_name, *values):
        from sdlora.configfile import config_to_toml

        form = dict(zip(order, values, strict=True))
        sections: dict[str, dict] = {}
        for field_name, value in form.items():
            section, key = KNOBS[field_name]
            if isinstance(value, str):
                value = value.strip()
            if field_name in INTS and value is not None:
                value = int(value)
            if field_name == "dataset" and value:
                value = str(Path(value).expanduser().resolve())
            sections.setdefault(section, {})[key] = value if value != "" else None
        sections["output"]["dir"] = str(workspace / "runs" / (form["name"] or "style"))
        path = None if preset_name == "defaults" else presets_folder() / f"{preset_name}.toml"
        try:
            config = runs.form_config(runs.preset_dict(path), sections)
        except SdloraError as e:
            return gr.skip(), f"**config error:** {e}"
        return config_to_toml(config), ""

    def toml_to_form(text):
        try:
            config = runs.parse_config(text)
        except SdloraError as e:
            return *([gr.skip()] * len(order)), f"**config error:** {e}", gr.skip()
        values = [getattr(getattr(config, s), k) for s, k in (KNOBS[f] for f in order)]
        return *values, "", family_text(config.model.base)

    toml.value, _ = form_to_toml(*initial)
    form_inputs = [preset, *fields.values()]
    for component in form_inputs:
        if component not in (base, preset):
            component.input(form_to_toml, form_inputs, [toml, error])
    toml.input(toml_to_form, toml, [*fields.values(), error, family])

    def suggest_preset(base_value):
        from sdlora.models import base_family

        try:
            name = runs.suggested_preset(base_value.strip(), base_family(base_value.strip()))
        except SdloraError:
            return gr.skip()
        return name or gr.skip()

    def preset_to_form(preset_name, *values):
        """The preset's own values of the form's settings (the rest stay as they are)."""
        path = None if preset_name == "defaults" else presets_folder() / f"{preset_name}.toml"
        raw = runs.preset_dict(path)
        return [
            raw.get(KNOBS[name][0], {}).get(KNOBS[name][1], value)
            for name, value in zip(order, values, strict=True)
        ]

    fill = dict(fn=preset_to_form, inputs=form_inputs, outputs=list(fields.values()))
    # A new base: its family shown, its family's preset chosen and filled in, the TOML rebuilt.
    base.input(family_text, base, family)
    base.input(suggest_preset, base, preset).then(**fill).then(
        form_to_toml, form_inputs, [toml, error]
    )
    preset.input(**fill).then(form_to_toml, form_inputs, [toml, error])

    def checked(text):
        config = runs.parse_config(text)
        out = Path(config.output.dir).resolve()
        if not out.is_relative_to(workspace):
            raise SdloraError(
                f"output.dir {out} is outside the workspace {workspace}; the studio writes "
                "runs only there"
            )
        return config

    def planned(config, where: str) -> str:
        found = runs.estimate(config)
        found.memory = runs.memory_text(config, where)
        return found.text()

    def do_estimate(text, wanted):
        try:
            config = checked(text)
            where = runs.job_device(wanted or config.train.device, queue.jobs(), runs.gpu_count())
            return planned(config, where), ""
        except SdloraError as e:
            return "", f"**config error:** {e}"

    estimate_button.click(do_estimate, [toml, device], [estimate, error])

    def do_queue(text, wanted):
        try:
            config = checked(text)
            job = runs.submit_train(queue, config, device=wanted or "")
            plan = planned(config, job.device)
        except SdloraError as e:
            return f"**not queued:** {e}", gr.skip()
        return (
            f"queued job **{job.id}** ({job.title}, {job.steps} steps, on {job.device}) · see Jobs",
            plan,
        )

    queue_button.click(do_queue, [toml, device], [status, estimate])
