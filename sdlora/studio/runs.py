"""What the studio's Train and Watch screens ask of the library: a config from the form or the
TOML editor, the estimate before a run, queueing a run or its continuation, and reading a run
folder's progress (log.jsonl, samples, report) while it trains."""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import Config
from sdlora.configfile import config_from_dict, config_to_toml, replace
from sdlora.errors import SdloraError
from sdlora.studio.jobs import QUEUED, Job, JobQueue

# Which shipped preset suits a family (configs/); others start from the defaults.
PRESET_FOR_FAMILY = {"sd1": "sd15-style", "sd2-v": "sd21-768-style", "sdxl": "sdxl-style"}
RUN_FILES = ("run.json", "learning_report.json", "ab_grid.png", "config.toml", "log.jsonl")


def parse_config(text: str, source: str = "the TOML editor") -> Config:
    """The config the editor's text says, or SdloraError naming the bad key or line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SdloraError(f"{source} is not valid TOML: {e}") from None
    config = config_from_dict(raw, source=source)
    for name, value in (("dataset.path", config.dataset.path), ("output.dir", config.output.dir)):
        if not Path(value).is_absolute():
            raise SdloraError(f"{name} in {source} must be an absolute path, got {value!r}")
    return config


def suggested_preset(base: str, family: str) -> str | None:
    """The shipped preset for a base: `demo` for micro, the family's for a real checkpoint,
    none for the tiny test bases."""
    if base == "micro":
        return "demo"
    if base.startswith("tiny:"):
        return None
    return PRESET_FOR_FAMILY.get(family)


def preset_dict(path: Path | None) -> dict:
    """A preset file's sections without its placeholder paths (the form supplies those)."""
    if path is None:
        return {}
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    if raw.get("model", {}).get("base") != "micro":
        raw.get("model", {}).pop("base", None)
    raw.get("output", {}).pop("dir", None)
    dataset = raw.get("dataset", {})
    if "path" in dataset:  # kept when it names a folder that exists (the demo's example set)
        folder = (path.parent / dataset["path"]).resolve()
        if folder.is_dir():
            dataset["path"] = str(folder)
        else:
            dataset.pop("path")
    return raw


def form_config(preset: dict, values: dict[str, dict]) -> Config:
    """The preset with the form's values (`{"train": {"steps": 100}, ...}`) laid over it."""
    raw = {section: dict(keys) for section, keys in preset.items()}
    for section, keys in values.items():
        raw.setdefault(section, {}).update({k: v for k, v in keys.items() if v is not None})
    return config_from_dict(raw, source="the form")


@dataclass
class Estimate:
    images: int
    repeats: list[int]
    steps_per_epoch: int
    steps: int
    epochs: float
    memory: str = ""
    """The memory line (see `memory_text`); empty when not asked for."""

    def text(self) -> str:
        reps = sorted(set(self.repeats))
        rep = str(reps[0]) if len(reps) == 1 else f"{reps[0]}-{reps[-1]}"
        lines = [
            f"{self.images} images × {rep} repeats = {sum(self.repeats)} per epoch; "
            f"{self.steps} steps ≈ {self.epochs:.1f} epochs ({self.steps_per_epoch} steps each)"
        ]
        return "\n\n".join(lines + ([self.memory] if self.memory else []))


def memory_text(config: Config, device: str) -> str:
    """The expected GPU memory of `config` on `device` (`cpu` or `cuda:N`), as an estimate."""
    from sdlora.memory import meta_parameters, training_memory
    from sdlora.models import base_family

    if device == "cpu":
        return "memory: CPU training; the GPU memory estimate does not apply (n/a)"
    base = config.model.base
    if base == "micro" or base.startswith("tiny:"):
        return f"memory on {device}: well under 1 GiB (a built-in test base; estimate)"
    family = base_family(base, config.model.family)
    lora, train = config.lora, config.train
    params = meta_parameters(
        family, lora.rank, lora.unet_targets, lora.text_encoder, lora.conv_rank, lora.dora
    )
    found = training_memory(
        params, family, train.mixed_precision, train.optimizer, config.dataset.resolution,
        train.batch_size, train.gradient_checkpointing,
    )  # fmt: skip
    return f"memory on {device}: {found.text()}"


def estimate(config: Config) -> Estimate:
    """Images, repeats, steps and epochs of `config`, from the same scan the trainer does."""
    from sdlora.epochs import steps_per_epoch
    from sdlora.train import scan_dataset, total_steps

    scan = scan_dataset(config.dataset)
    scan.require_examples()
    per_epoch = steps_per_epoch(scan, config.train.batch_size, config.train.grad_accum)
    steps = total_steps(scan, config.train)
    return Estimate(
        images=len(scan.examples),
        repeats=[e.repeats for e in scan.examples],
        steps_per_epoch=per_epoch,
        steps=steps,
        epochs=steps / per_epoch,
    )


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def job_device(wanted: str, jobs: list[Job], gpus: int) -> str:
    """The device a job runs on: `cpu` or `cuda:N`. `wanted` is `train.device` (`auto`, `cpu`,
    `cuda`) or a GPU the user picked (`cuda:N`). `auto` and `cuda` take the GPU with the fewest
    jobs queued or running (the lowest index on a tie); `auto` without a GPU is `cpu`."""
    if wanted == "cpu":
        return "cpu"
    if wanted.startswith("cuda:"):
        index = wanted.removeprefix("cuda:")
        if not index.isdigit() or int(index) >= gpus:
            raise SdloraError(
                f"device {wanted} is not one of the {gpus} GPU(s) the studio sees; pick "
                + ", ".join(["cpu", *(f"cuda:{i}" for i in range(gpus))])
            )
        return f"cuda:{int(index)}"
    if gpus == 0:
        if wanted == "cuda":
            raise SdloraError("train.device is cuda but the studio sees no GPU; use cpu or auto")
        return "cpu"
    waiting = [job.device for job in jobs if job.status == QUEUED or job.active]
    return min((f"cuda:{i}" for i in range(gpus)), key=waiting.count)


def submit_train(queue: JobQueue, config: Config, title: str = "", device: str = "") -> Job:
    """Queue `sdlora train` on `config`, on `device` (`cuda:N`, `cpu`; empty: as train.device
    says). Without checkpoints configured, its last step is kept as one (train.save_every =
    steps), so Continue can resume it later."""
    steps = estimate(config).steps
    chosen = job_device(device or config.train.device, queue.jobs(), gpu_count())
    changes = {"device": "cuda" if chosen.startswith("cuda") else "cpu"}
    if config.train.save_every == 0:
        changes["save_every"] = steps
    config = replace(config, train=changes)
    return _queue_config(queue, config, steps, title or Path(config.output.dir).name, chosen)


def submit_continue(queue: JobQueue, job_id: str, more_steps: int) -> Job:
    """Queue `more_steps` more steps of a stopped or finished run, from its newest checkpoint,
    so the step count goes on where it stopped (`train.resume=latest`)."""
    from sdlora.checkpoint import complete_checkpoints

    if more_steps < 1:
        raise SdloraError(f"steps to add must be at least 1, got {more_steps}")
    job = queue.get(job_id)
    if job.kind != "train" or job.run_dir is None or job.active:
        raise SdloraError(f"job {job_id} is not a finished or stopped training run")
    run_dir = Path(job.run_dir)
    found = complete_checkpoints(run_dir)
    if not found:
        raise SdloraError(
            f"{run_dir} holds no checkpoint to continue from; train it again with "
            "train.save_every set"
        )
    at = int(found[-1].name.removeprefix("step_"))
    config = parse_config((run_dir / "config.toml").read_text(encoding="utf-8"), "config.toml")
    steps = at + more_steps
    config = replace(
        config, train={"resume": "latest", "steps": steps, "epochs": None, "save_every": steps}
    )
    title = f"{Path(job.run_dir).name} +{more_steps}"
    new = _queue_config(queue, config, steps, title, job.device)  # where the run has been
    new.continues = job_id
    return queue.submit(new)


def _queue_config(queue: JobQueue, config: Config, steps: int, title: str, device: str) -> Job:
    job_id, folder = queue.new_folder()
    path = folder / "config.toml"
    path.write_text(config_to_toml(config), encoding="utf-8")
    job = Job(
        id=job_id,
        kind="train",
        args=["train", str(path), "--no-progress"],
        title=title,
        device=device,
        run_dir=config.output.dir,
        steps=steps,
    )
    return queue.submit(job)


def submit_caption(
    queue: JobQueue, folder: str, trigger: str, template: str = "", overwrite: bool = False
) -> Job:
    """Queue `sdlora caption` on a dataset folder (template captions; only sidecars written)."""
    if not Path(folder).is_dir():
        raise SdloraError(f"dataset folder {folder} does not exist")
    if not trigger.strip():
        raise SdloraError("a trigger word is needed to caption: it is put first in every caption")
    args = ["caption", str(Path(folder).resolve()), "--trigger", trigger.strip()]
    args += ["--template", template] if template else []
    args += ["--overwrite"] if overwrite else []
    job_id, _ = queue.new_folder()
    return queue.submit(Job(id=job_id, kind="caption", args=args, title=f"caption {folder}"))


@dataclass
class Progress:
    """How far a run is: the logged steps and losses, the pace and what it has written."""

    steps: list[int]
    losses: list[float]
    total: int | None
    per_s: float | None
    eta_s: float | None
    samples: list[Path]
    files: list[Path]
    report: dict | None

    @property
    def step(self) -> int:
        return self.steps[-1] if self.steps else 0


# log.jsonl read last, per path: (mtime_ns, size) -> (steps, losses); the Jobs screen asks
# every second for every run, and a log only changes while its run trains.
_LOGS: dict[Path, tuple[tuple[int, int], tuple[list[int], list[float]]]] = {}


def read_log(run_dir: Path) -> tuple[list[int], list[float]]:
    """Steps and training losses of log.jsonl (a line being written, and the validation
    lines, which hold `val_loss` instead, are skipped)."""
    path = Path(run_dir) / "log.jsonl"
    try:
        stat = path.stat()
    except OSError:
        return [], []
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _LOGS.get(path)
    if cached is None or cached[0] != key:
        cached = _LOGS[path] = (key, _parse_log(path))
    steps, losses = cached[1]
    return list(steps), list(losses)


def _parse_log(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return steps, losses
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "loss" not in entry:
            continue
        steps.append(int(entry["step"]))
        losses.append(float(entry["loss"]))
    return steps, losses


def run_progress(job: Job, pace: dict[str, tuple[int, float]] | None = None) -> Progress:
    """The progress of `job`'s run. `pace` keeps the first (step, time) seen per job, so the
    rate is measured over the steps this UI has watched (log.jsonl holds no times)."""
    run_dir = Path(job.run_dir or ".")
    steps, losses = read_log(run_dir)
    per_s = eta = None
    if pace is not None and steps and job.active:
        now = time.time()
        first_step, first_time = pace.setdefault(job.id, (steps[-1], now))
        if steps[-1] > first_step and now > first_time:
            per_s = (steps[-1] - first_step) / (now - first_time)
            if job.steps:
                eta = max(job.steps - steps[-1], 0) / per_s
    report = None
    if (run_dir / "learning_report.json").is_file():
        try:
            report = json.loads((run_dir / "learning_report.json").read_text(encoding="utf-8"))
        except ValueError:
            report = None
    samples = sorted((run_dir / "samples").glob("step_*.png")) if run_dir.is_dir() else []
    files = sorted(run_dir.glob("*.safetensors")) if run_dir.is_dir() else []
    files += [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    return Progress(steps, losses, job.steps, per_s, eta, samples, files, report)
