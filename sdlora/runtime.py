"""What a training run needs from the machine: optimizers, memory settings, processes."""

from __future__ import annotations

import resource
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from sdlora.errors import SdloraError
from sdlora.models import Base

# sd-scripts records the optimizer's class path in `ss_optimizer`.
OPTIMIZER_NAMES = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "prodigy": "prodigyopt.Prodigy",
}


def make_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names; the optional ones say how to install them."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SdloraError(
                "train.optimizer=adamw8bit needs bitsandbytes (CUDA): pip install bitsandbytes"
            ) from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise SdloraError(
            "train.optimizer=prodigy needs prodigyopt: pip install prodigyopt"
        ) from None
    return Prodigy(groups, weight_decay=weight_decay)


def configure_memory(base: Base, c_train, device: torch.device) -> None:
    """Gradient checkpointing and the attention kernel, as the config asks."""
    if c_train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in base.text_encoders.values():
            encoder.gradient_checkpointing_enable({"use_reentrant": False})
    if c_train.attention == "xformers":
        if device.type != "cuda":
            raise SdloraError("train.attention=xformers needs a CUDA device; use sdpa")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise SdloraError(
                "train.attention=xformers but xformers is not installed: "
                "pip install 'sdlora[xformers]', or use sdpa"
            ) from None
        base.unet.enable_xformers_memory_efficient_attention()


def take_batch(order, accelerator: Accelerator) -> list[int]:
    """This process's batch: of every `num_processes` batches, the one at its index."""
    batches = [next(order) for _ in range(accelerator.num_processes)]
    return batches[accelerator.process_index]


@contextmanager
def out_of_memory_advice(step: int):
    try:
        yield
    except torch.OutOfMemoryError:
        raise SdloraError(
            f"out of memory at step {step}: lower train.batch_size or dataset.resolution, or set "
            "train.gradient_checkpointing=true and train.mixed_precision=bf16"
        ) from None


def ranks_agree(params: dict[str, torch.Tensor], accelerator: Accelerator) -> bool:
    """Whether every process holds the same LoRA weights (a checksum compared across ranks)."""
    if accelerator.num_processes == 1:
        return True
    total = torch.stack([p.detach().double().sum() for p in params.values()]).sum()
    sums = accelerator.gather(total.reshape(1).to(accelerator.device))
    return bool(torch.all(sums == sums[0]))


class PeakMemory:
    """Peak memory of the run: CUDA allocations on a GPU, the process's resident set on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def megabytes(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
