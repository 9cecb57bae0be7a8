"""The noise schedule of a base and the sampler settings that match it.

A base predicts either the noise (`epsilon`) or the velocity (`v_prediction`), and may be
trained with zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
Steps are Flawed": betas rescaled so the last timestep is pure noise). Training must use the
base's own setting, and sampling must match it: with zero terminal SNR the sampler starts at
the last timestep (`trailing` spacing) and rescales the guided prediction (φ = 0.7), or a
v-prediction base gives washed-out or black images. Here the setting is resolved once (from the
base, its file's metadata, or the user) and turned into scheduler configs and LoRA metadata.
"""

from __future__ import annotations

from diffusers import DDPMScheduler

from sdlora.errors import SdloraError
from sdlora.families import PREDICTION_TYPES

GUIDANCE_RESCALE = 0.7
"""φ of the paper's rescaled classifier-free guidance, the value it recommends."""
# ModelSpec writes the prediction type as `epsilon` or `v`.
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}
SCHEDULE_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")


def with_schedule(
    config: dict, prediction_type: str | None = None, zero_terminal_snr: bool = False
) -> DDPMScheduler:
    """The training scheduler: `config` (a scheduler config) with `prediction_type` (None: the
    config's own) and, with `zero_terminal_snr` or when `config` already has it, the betas
    rescaled to zero terminal SNR and samplers made from it spaced `trailing`."""
    config = dict(config)
    if prediction_type is not None:
        check_prediction_type(prediction_type, "prediction type")
        config["prediction_type"] = prediction_type
    if zero_terminal_snr or config.get("rescale_betas_zero_snr"):
        if config.get("prediction_type", "epsilon") != "v_prediction":
            raise SdloraError(
                "zero terminal SNR needs a v-prediction base: with epsilon prediction the last "
                "timestep is pure noise with nothing to predict, and samplers divide by zero. "
                "If the base is v-prediction, say so (model.prediction_type = "
                '"v_prediction", or --prediction-type v_prediction); else leave zero terminal '
                "SNR off"
            )
        # Timestep spacing is a sampler setting; samplers built from this config inherit it.
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    # diffusers re-applies its defaults to the keys it lists here: not to the ones set above.
    defaults = config.get("_use_default_values", [])
    config["_use_default_values"] = [k for k in defaults if k not in SCHEDULE_KEYS]
    return DDPMScheduler.from_config(config)


def check_prediction_type(value: str, name: str) -> None:
    if value not in PREDICTION_TYPES:
        raise SdloraError(f"{name} must be epsilon or v_prediction, got {value!r}")


def is_zero_terminal_snr(scheduler) -> bool:
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def guidance_rescale(scheduler) -> float:
    """The guidance rescale a sampler of this schedule needs: φ with zero terminal SNR, else 0."""
    return GUIDANCE_RESCALE if is_zero_terminal_snr(scheduler) else 0.0


def schedule_metadata(scheduler) -> dict[str, str]:
    """The LoRA metadata that records a training schedule: ModelSpec's prediction type and
    sd-scripts' `ss_v_parameterization` / `ss_zero_terminal_snr`."""
    prediction = scheduler.config.prediction_type
    return {
        "modelspec.prediction_type": MODELSPEC_PREDICTION[prediction],
        "ss_v_parameterization": str(prediction == "v_prediction"),
        "ss_zero_terminal_snr": str(is_zero_terminal_snr(scheduler)),
    }


def prediction_from_metadata(metadata: dict[str, str]) -> str | None:
    """The prediction type a file's metadata states (ModelSpec, else sd-scripts), if any."""
    stated = metadata.get("modelspec.prediction_type")
    for name, short in MODELSPEC_PREDICTION.items():
        if stated in (name, short):
            return name
    if metadata.get("ss_v_parameterization") in ("True", "False"):
        return "v_prediction" if metadata["ss_v_parameterization"] == "True" else "epsilon"
    return None


def zero_snr_from_metadata(metadata: dict[str, str]) -> bool:
    return metadata.get("ss_zero_terminal_snr") == "True"
