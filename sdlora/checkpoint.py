"""Training checkpoints: written atomically, resumed exactly, stopped cleanly on a signal.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding the LoRA parameters
(`lora.safetensors`), the optimizer, LR-schedule and random-generator states (`state.pt`, read
back with `weights_only=True`) and a `COMPLETE` marker written last. It is assembled in a
temporary folder, flushed and renamed into place, so a crash leaves either the whole
checkpoint or none; older checkpoints are removed only after a new one is complete.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from sdlora.errors import SdloraError
from sdlora.export import write_error, write_synced
from sdlora.families import FAMILIES, same_architecture
from sdlora.guard import IncompatibleLora

MARKER = "COMPLETE"
PREFIX = "step_"


@dataclass
class Rngs:
    """The random streams a resumed run must continue, seeded from the seed and process rank.

    The batch order is not among them: it is replayed from the seed on resume.
    """

    noise: torch.Generator  # noise and timesteps: per process
    prior: torch.Generator  # prior-preservation batches, their noise and timesteps
    augment: random.Random  # flips, crops, caption shuffles and dropout: per process

    @classmethod
    def seeded(cls, seed: int, rank: int = 0) -> Rngs:
        return cls(
            noise=torch.Generator().manual_seed(seed + 1 + 1000 * rank),
            prior=torch.Generator().manual_seed(seed + 2 + 1000 * rank),
            augment=random.Random(seed + 1000 * rank),
        )

    def state(self) -> dict:
        return {
            "noise": self.noise.get_state(),
            "prior": self.prior.get_state(),
            # random.Random's state as plain ints, loadable with weights_only=True
            "augment": list(self.augment.getstate()[1]) + [self.augment.getstate()[0]],
            "augment_gauss": self.augment.getstate()[2],
        }

    def restore(self, state: dict) -> None:
        self.noise.set_state(state["noise"])
        self.prior.set_state(state["prior"])
        *internal, version = state["augment"]
        self.augment.setstate((version, tuple(internal), state["augment_gauss"]))


def training_state(optimizer, lr_schedule, scaler, rngs: Rngs, family: str, ema=None) -> dict:
    """What a checkpoint holds besides the LoRA weights: enough to continue bit for bit.
    `scaler` is the fp16 gradient scaler, or None; `ema` the weights' moving average, or None."""
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rngs": rngs.state(),
        "family": family,
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_checkpoint(
    run_dir: Path,
    step: int,
    params: dict[str, torch.Tensor],
    state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically; then drop all but the newest `keep_last`.

    Weights holding NaN or infinity are refused, and a failed write (a full disk) is one error
    naming the file; either way the earlier checkpoints stay as they were.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    check_finite(tensors, step)
    files = {
        "lora.safetensors": safetensors.torch.save(tensors),
        "state.pt": _torch_bytes({**state, "step": step}),
        MARKER: f"{step}\n".encode(),  # written last: the checkpoint is whole once it exists
    }
    root = run_dir / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    tmp = None
    target = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        for name, data in files.items():
            target = tmp / name
            with target.open("wb") as f:
                write_synced(f, data)
        target = final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        raise write_error(target, e, sum(map(len, files.values()))) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Remove the temporary folders of checkpoints a killed run left half-written
    (`checkpoints/.step_NNNNNN.xxxx`); return them, so the caller can say so.

    Call it before training starts in `run_dir`: no other process writes there then.
    """
    root = run_dir / "checkpoints"
    found = sorted(p for p in root.glob(f".{PREFIX}*") if p.is_dir()) if root.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ones are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(run_dir: Path, spec: str) -> Path:
    """`latest` (the newest complete checkpoint of `run_dir`) or a checkpoint folder path."""
    if spec == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise SdloraError(
                f"train.resume=latest but {run_dir / 'checkpoints'} holds no complete checkpoint"
            )
        path = found[-1]
    else:
        path = Path(spec).expanduser()
        if not (path / MARKER).is_file():
            raise SdloraError(
                f"{path} is not a complete sdlora checkpoint (no {MARKER} marker); "
                "pass a checkpoints/step_NNNNNN folder or train.resume=latest"
            )
    _check_whole(path)
    return path


def _check_whole(path: Path) -> None:
    """Refuse a checkpoint whose files were cut short, before any model loads: a cheap look
    at the safetensors header and the index at the end of state.pt (a zip archive);
    `load_checkpoint` reads them in full."""
    file = path / "lora.safetensors"
    try:
        with safetensors.safe_open(file, "pt"):
            pass
        file = path / "state.pt"
        zipfile.ZipFile(file).close()
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever the reader says
        raise _unreadable(path, file, e) from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA parameters, training state) of a complete checkpoint; one holding NaN or
    infinity is refused (resuming from it would train on nothing but NaN). Its files are only
    read: a damaged checkpoint is named, with the one to resume from instead."""
    file = path / "lora.safetensors"
    try:
        params = safetensors.torch.load_file(file)
        file = path / "state.pt"
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever the reader says
        raise _unreadable(path, file, e) from None
    bad = next((name for name, t in params.items() if not t.isfinite().all()), None)
    if bad is not None:
        raise SdloraError(
            f"checkpoint {path} holds NaN or infinity (first in {bad}); {_instead(path)}"
        )
    return params, state


def _unreadable(path: Path, file: Path, error: Exception) -> SdloraError:
    # Readers explain at length (torch: a paragraph); the first sentence says what broke.
    reason = " ".join(str(error).split(". ")[0].split()) or type(error).__name__
    return SdloraError(f"checkpoint file {file} cannot be read ({reason}); {_instead(path)}")


def _instead(path: Path) -> str:
    """What to do when checkpoint `path` cannot be resumed: the newest complete one before it
    in its run, or a fresh start."""
    found = [p.resolve() for p in complete_checkpoints(path.parent.parent)]
    here = path.resolve()
    earlier = found[: found.index(here)] if here in found else []
    if earlier:
        return f"resume from an earlier checkpoint with train.resume={earlier[-1]}"
    return "no earlier checkpoint of the run is complete: start it again without train.resume"


def restore_checkpoint(
    path: Path, family: str, params: dict, optimizer, lr_schedule, scaler, rngs: Rngs
) -> int:
    """Restore LoRA weights, optimizer, schedule and random streams; return the step.

    `params` is `{component: {name: parameter}}` of the run; the checkpoint must have been made
    for the same family and the same LoRA (the version guard at resume).
    """
    tensors, state = load_checkpoint(path)
    if not same_architecture(state.get("family", family), family):
        raise IncompatibleLora(
            f"checkpoint {path} was trained on {FAMILIES[state['family']].title}; "
            f"the base is {FAMILIES[family].title}"
        )
    flat = {f"{c}.{n}": p for c, ps in params.items() for n, p in ps.items()}
    differ = sorted(set(flat) ^ set(tensors))
    differ += [k for k in flat if k in tensors and tensors[k].shape != flat[k].shape]
    if differ:
        raise IncompatibleLora(
            f"checkpoint {path} does not match this run's LoRA ({len(differ)} parameter(s) "
            f"differ, first: {', '.join(differ[:3])}); resume with the config it was made with "
            f"({path.parent.parent / 'config.toml'})"
        )
    with torch.no_grad():
        for name, param in flat.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rngs.restore(state["rngs"])
    return int(state["step"])


def check_finite(params: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to write LoRA weights holding NaN or infinity."""
    for name, param in params.items():
        if not torch.isfinite(param).all():
            raise SdloraError(
                f"LoRA weight {name} is not finite at step {step}; nothing was written. "
                "Lower train.lr and resume from the last checkpoint"
            )


class Interrupted(SdloraError):
    """The run was stopped by a signal after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    @classmethod
    def after(cls, step: int, signum: int, saved: Path | None, run_dir: Path) -> Interrupted:
        """The stop after `step`, with the checkpoint written and the command that resumes."""
        return cls(
            f"stopped by signal {signum} after step {step}; checkpoint {saved}. "
            f"Resume with: sdlora train {run_dir / 'config.toml'} train.resume=latest",
            signum,
        )


class StopOnSignal:
    """While active, SIGINT/SIGTERM only ask the loop to stop after the current step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
            self._previous.clear()
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
