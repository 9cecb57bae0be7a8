"""An exponential moving average (EMA) of the LoRA weights, saved as the LoRA when enabled.

The average smooths the step-to-step noise of a small-batch run, so the saved LoRA is less
sensitive to where training happened to stop. It uses diffusers' `EMAModel`, whose decay warms
up as (1 + t) / (10 + t) up to `train.ema_decay`, so early averages are not dominated by the
initial weights. Its state is part of every checkpoint, and a resumed run continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from sdlora.checkpoint import load_checkpoint
from sdlora.errors import SdloraError


class LoraEma:
    """The moving average of `params` (the run's LoRA parameters by name)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.params = list(params.values())
        self.average = EMAModel(self.params, decay=decay)

    def step(self) -> None:
        """Fold the parameters as they are after an optimizer step into the average."""
        self.average.step(self.params)

    def state_dict(self) -> dict:
        state = self.average.state_dict()
        return {
            **state,
            "shadow_params": [p.detach().cpu().clone() for p in state["shadow_params"]],
        }

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
        self.average.shadow_params = [
            s.to(p.device) for s, p in zip(self.average.shadow_params, self.params, strict=True)
        ]

    def copy_to_params(self) -> None:
        """Put the average into the parameters (for good: the run's end)."""
        self.average.copy_to(self.params)

    @contextmanager
    def applied(self):
        """The average in the parameters for a while (to save it), the weights restored after."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)


def make_ema(
    params: dict[str, torch.Tensor], decay: float | None, resume_from: Path | None = None
) -> LoraEma | None:
    """The run's EMA (None when `train.ema_decay` is unset), continued from the checkpoint
    `resume_from` when the run resumes."""
    if decay is None:
        return None
    ema = LoraEma(params, decay)
    if resume_from is not None:
        state = load_checkpoint(resume_from)[1]
        if "ema" not in state:
            raise SdloraError(
                f"checkpoint {resume_from} holds no EMA of the weights (it was made without "
                "train.ema_decay); resume without train.ema_decay, or start a new run"
            )
        ema.load_state_dict(state["ema"])
    return ema
