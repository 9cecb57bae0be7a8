"""What a training run writes about itself: the resolved config, the loss log, the LoRA files
with sd-scripts' training metadata, and run.json. Only the main process writes."""

from __future__ import annotations

import glob
import json
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from sdlora import export
from sdlora.checkpoint import complete_checkpoints, remove_incomplete, save_checkpoint
from sdlora.config import Config
from sdlora.configfile import config_to_toml
from sdlora.dataset import Scan
from sdlora.epochs import steps_per_epoch
from sdlora.errors import SdloraError
from sdlora.lora import Lora
from sdlora.preflight import folder_counts, tag_frequency
from sdlora.runtime import OPTIMIZER_NAMES
from sdlora.step import quality_metadata


class RunRecord:
    """The run folder's files other than samples: config, log, checkpoints, LoRAs, run.json."""

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        scan: Scan,
        train_te: bool,
        processes: int,
        base_name: str,
    ):
        self.run_dir, self.config, self.scan = run_dir, config, scan
        self.train_te, self.processes, self.base_name = train_te, processes, base_name
        self.started = time.time()
        self.log_path = run_dir / "log.jsonl"

    def write_config(self) -> None:
        """config.toml: the resolved config, which also resumes the run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(self.config), encoding="utf-8")

    def resume_log(self, resumed_at: int) -> list[float]:
        """Keep the log's lines up to `resumed_at` (none for a fresh run); their losses.

        log.jsonl has a line per logged step, `{"step", "loss", "lr"}`, and a line per
        validation, `{"step", "val_loss", "val_images"}`."""
        entries = _read_entries(self.log_path) if resumed_at else []
        kept = [entry for entry in entries if entry["step"] <= resumed_at]
        self.log_path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        return [entry["loss"] for entry in kept if "loss" in entry]

    def log_step(self, accelerator, step: int, loss: float, lr: float, grad_norm: float) -> None:
        """One line of log.jsonl, and the step's scalars to accelerate's trackers."""
        self._log({"step": step, "loss": loss, "lr": lr})
        accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step)

    def log_validation(self, step: int, loss: float, images: str) -> None:
        """A validation line of log.jsonl (`images`: which images it measured)."""
        self._log({"step": step, "val_loss": loss, "val_images": images})

    def validation_log(self) -> list[tuple[int, float]]:
        """(step, validation loss) of every validation line in log.jsonl."""
        entries = _read_entries(self.log_path)
        return [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]

    def _log(self, entry: dict) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")

    def write_lora(self, path: Path, lora: Lora, at_step: int, steps: int) -> None:
        """The LoRA as trained up to `at_step` of `steps`, in the file sd-scripts writes."""
        c = self.config
        metadata = export.build_metadata(
            family=lora.family,
            title=c.output.name,
            rank=c.lora.rank,
            alpha=c.lora.alpha,
            trigger_words=[c.dataset.trigger],
            resolution=c.dataset.resolution,
            base_name=self.base_name,
            base_label=c.model.base_label,
            tag_frequency=tag_frequency(self.scan),
            training=self.training_metadata(at_step, steps),
            algo=c.lora.algo,
            conv_rank=c.lora.conv_rank,
            conv_alpha=c.lora.conv_alpha,
            dora=c.lora.dora,
            lokr_factor=c.lora.lokr_factor,
            decompose_both=c.lora.lokr_decompose_both,
        )
        metadata.update(lora.metadata)  # what the LoRA knows of its schedule (prediction type)
        export.save_kohya(path, lora, lora.family, metadata, dtype=c.output.dtype)

    def training_metadata(self, at_step: int, steps: int) -> dict:
        """The training-run `ss_*` fields (without prefix), all strings."""
        c, t, scan = self.config, self.config.train, self.scan
        per_epoch = steps_per_epoch(scan, t.batch_size, t.grad_accum, self.processes)
        return {
            "learning_rate": str(t.lr),
            "unet_lr": str(t.lr),
            "text_encoder_lr": str(t.te_lr if self.train_te else 0.0),
            "steps": str(at_step),
            "max_train_steps": str(steps),
            "epoch": str(-(-at_step // per_epoch)),
            "optimizer": OPTIMIZER_NAMES[t.optimizer],
            "lr_scheduler": t.lr_scheduler,
            "lr_warmup_steps": str(t.warmup_steps),
            "mixed_precision": t.mixed_precision,
            "seed": str(t.seed),
            "batch_size_per_device": str(t.batch_size),
            "gradient_accumulation_steps": str(t.grad_accum),
            "max_grad_norm": str(t.max_grad_norm),
            "num_train_images": str(len(scan.examples)),
            "dataset_dirs": json.dumps(folder_counts(scan)),
            "enable_bucket": str(c.dataset.buckets),
            "bucket_info": json.dumps({"buckets": scan.bucket_counts()}),
            "flip_aug": str(c.dataset.flip),
            "random_crop": str(c.dataset.crop == "random"),
            "shuffle_caption": str(c.dataset.shuffle_tags),
            "keep_tokens": str(c.dataset.keep_tokens),
            "caption_dropout_rate": str(c.dataset.caption_dropout),
            "caption_tag_dropout_rate": str(c.dataset.tag_dropout),
            "training_started_at": str(self.started),
            "training_finished_at": str(time.time()),
            "clip_skip": str(t.clip_skip) if t.clip_skip else "None",
            "noise_offset": str(t.noise_offset) if t.noise_offset else "None",
            "min_snr_gamma": str(t.min_snr_gamma),
            "network_train_unet_only": str(not self.train_te),
            **quality_metadata(t),
            "masked_loss": str(any(e.mask for e in scan.examples)),
        }

    def checkpoint(
        self, step: int, steps: int, params: dict[str, torch.Tensor], state: dict, lora: Lora
    ) -> Path:
        """checkpoints/step_NNNNNN (resumable), and the LoRA file of that step unless
        `output.step_loras` is off; returns the checkpoint folder."""
        c_out = self.config.output
        saved = save_checkpoint(self.run_dir, step, params, state, self.config.train.keep_last)
        if c_out.step_loras:
            path = self.run_dir / f"{c_out.name}-step{step:06d}.safetensors"
            self.write_lora(path, lora, step, steps)
        return saved

    def write_report(
        self,
        steps: int,
        start: int,
        losses: list[float],
        wall: float,
        peak_mb: float,
        agree: bool,
        accelerator,
    ) -> None:
        """run.json: what the loop measured (from step `start` to `steps`), the LoRA written,
        the processes and whether they agree, and the dataset part."""
        t = self.config.train
        per_step = t.batch_size * t.grad_accum * self.processes
        self._write_json({
            "steps": steps,
            "resumed_at": start,
            "wall_time_s": round(wall, 3),
            "samples_per_s": round((steps - start) * per_step / wall, 3),
            "peak_memory_mb": peak_mb,
            "processes": self.processes,
            "distributed": accelerator.distributed_type.value,
            "ranks_agree": agree,
            "final_loss": losses[-1],
            "lora": str(self.run_dir / f"{self.config.output.name}.safetensors"),
            **scan_summary(self.scan),
        })  # fmt: skip

    def add_to_report(self, fields: dict) -> None:
        """Add `fields` to run.json (after `write_report`)."""
        self._write_json({**self.report, **fields})

    def _write_json(self, report: dict) -> None:
        self.report = report
        text = json.dumps(report, indent=2)
        (self.run_dir / "run.json").write_text(text, encoding="utf-8")

    @contextmanager
    def after_save(self, lora_path: Path):
        """Work done once the LoRA is saved (samples, the report): a failure there is one
        error that says the LoRA is safe, and run.json records it."""
        try:
            yield
        except SdloraError as e:
            self._failed(lora_path, str(e))
        except Exception as e:  # noqa: BLE001 - anything: the saved LoRA must not look lost
            self._failed(lora_path, f"{type(e).__name__}: {e}")

    def _failed(self, lora_path: Path, what: str) -> None:
        self._write_json({**self.report, "error": f"end-of-run samples or report: {what}"})
        raise SdloraError(
            f"{lora_path} is saved, but the end-of-run samples or report failed: {what} "
            f"(see {self.run_dir / 'run.json'})"
        ) from None


RUN_FILES = (
    "log.jsonl",
    "run.json",
    "checkpoints.json",
    "progress.png",
    "checkpoints.png",
    "loss.png",
    "learning_report.json",
    "ab_grid.png",
)
"""The run folder's own files; some are written only with some settings, so a fresh run that
leaves one out would otherwise leave an earlier run's copy beside its own files."""


def earlier_run(run_dir: Path, name: str) -> tuple[list[Path], list[Path]]:
    """What an earlier run of `name` left in `run_dir`: (its step LoRAs and complete
    checkpoints, the newest checkpoint last; the rest: best copy, sample grids, TensorBoard
    events, the run's files). Only names sdlora writes are matched; the LoRA itself is
    replaced when the new one is saved. Other files in the folder are never listed."""
    kept = [*sorted(run_dir.glob(f"{glob.escape(name)}-step[0-9]*.safetensors")),
            *complete_checkpoints(run_dir)]  # fmt: skip
    rest = [
        run_dir / f"{name}-best.safetensors",
        *(run_dir / f for f in RUN_FILES),
        *(run_dir / "samples").glob("step_[0-9]*.png"),
        *(run_dir / "logs").rglob("events.out.tfevents.*"),
    ]
    return kept, sorted(p for p in rest if p.is_file())


def clear_earlier_run(run_dir: Path, name: str, overwrite: bool, remove: bool) -> list[str]:
    """Before a fresh (not resumed) run: refuse a folder holding an earlier run's checkpoints
    or step LoRAs unless `overwrite` (they may be the run to resume), then, when `remove` (the
    main process), delete what the earlier run left (earlier_run) so that no sample, step
    file or checkpoint of it is mistaken for the new run's (`train.resume=latest` would pick
    a checkpoint of the earlier run). Returns the lines that say what went."""
    kept, rest = earlier_run(run_dir, name)
    if kept and not overwrite:
        raise SdloraError(
            f"{run_dir} holds an earlier run's checkpoints or step LoRAs (newest: "
            f"{kept[-1].relative_to(run_dir)}); resume it with train.resume=latest, choose another "
            "output.dir, or set output.overwrite=true to start afresh (they are removed)"
        )
    if not remove or not (kept or rest):
        return []
    for path in kept + rest:
        if path.is_dir():  # a checkpoint
            shutil.rmtree(path)
        else:
            path.unlink()
    return [f"sdlora: removed {len(kept + rest)} file(s) an earlier run left in {run_dir}"]


def tidy_run_dir(run_dir: Path, name: str, overwrite: bool, resumed: bool, main: bool) -> list[str]:
    """Before training starts in `run_dir`: checkpoints a killed run left half-written go
    (the main process removes them), and a fresh run clears what an earlier one left
    (clear_earlier_run). Returns the lines that say what went."""
    lines = [f"sdlora: removed {stale}: a checkpoint left half-written by a killed run"
             for stale in (remove_incomplete(run_dir) if main else ())]  # fmt: skip
    return lines if resumed else lines + clear_earlier_run(run_dir, name, overwrite, main)


def scan_summary(scan: Scan) -> dict:
    """The dataset part of run.json: images used, and the files skipped or warned about."""
    return {
        "images": len(scan.examples),
        "skipped": [{"file": str(p.path), "reason": p.reason} for p in scan.skipped],
        "warnings": [{"file": str(p.path), "reason": p.reason} for p in scan.warnings],
    }


def _read_entries(path: Path) -> list[dict]:
    """log.jsonl's entries; a line that is not one (a run killed while writing it) is left out,
    with a warning."""
    lines = (
        path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    )
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
        else:
            warnings.warn(f"{path} line {number} is not a whole log entry; left out", stacklevel=3)
    return entries
