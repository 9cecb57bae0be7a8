"""Every shipped preset trains, and so does every mix of precision, gradient checkpointing and
text-encoder LoRA: two steps each on a tiny base of the right family."""

from __future__ import annotations

import itertools

import pytest
from conftest import REPO, tiny_overrides
from safetensors import safe_open

from sdlora import load_config, train
from sdlora.schedule import MODELSPEC_PREDICTION

# Each preset with the built-in base of its family (a preset not listed here fails the test).
PRESET_BASES = {
    "demo.toml": ("micro", 32),
    "sd15-style.toml": ("tiny:sd1", 64),
    "sd21-768-style.toml": ("tiny:sd2-v", 64),
    "sdxl-style.toml": ("tiny:sdxl", 64),
    "sdxl-community-style.toml": ("tiny:sdxl", 64),
    "sdxl-vpred-style.toml": ("tiny:sdxl", 64),  # made v-prediction by the preset itself
}
QUIET = ["sample.prompts=[]", "sample.report_images=0", "train.prior_images=0"]


def _lora_keys(path):
    with safe_open(path, "pt") as f:
        return list(f.keys())


def test_every_preset_is_listed_here():
    assert sorted(p.name for p in (REPO / "configs").glob("*.toml")) == sorted(PRESET_BASES)


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("preset", sorted(PRESET_BASES))
def test_each_preset_trains_two_steps_with_checkpointing(preset, precision, style_dir, tmp_path):
    base, resolution = PRESET_BASES[preset]
    overrides = [
        f"model.base={base}",
        f"dataset.path={style_dir}",
        f"dataset.resolution={resolution}",
        f"output.dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.save_every=0",
        f"train.mixed_precision={precision}",
        "train.gradient_checkpointing=true",
        *QUIET,
    ]
    config = load_config(REPO / "configs" / preset, overrides)
    result = train(config, progress=False)
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)
    assert any(k.startswith("lora_unet_") for k in _lora_keys(result.lora_path))
    with safe_open(result.lora_path, "pt") as f:
        metadata = f.metadata()
    prediction = config.model.prediction_type or result.base.prediction_type
    assert metadata["modelspec.prediction_type"] == MODELSPEC_PREDICTION[prediction]
    assert metadata["ss_zero_terminal_snr"] == str(config.train.zero_terminal_snr)


@pytest.mark.parametrize(
    ("family", "precision", "checkpointing", "text_encoder"),
    [("sd1", *combo) for combo in itertools.product(["no", "bf16"], [False, True], [False, True])]
    + [("sdxl", "bf16", True, True), ("sdxl", "no", True, True)],
)
def test_precision_checkpointing_and_text_encoder_lora_train_together(
    family, precision, checkpointing, text_encoder, style_dir, tmp_path
):
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + [
        f"model.base=tiny:{family}",
        f"train.mixed_precision={precision}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        f"lora.text_encoder={str(text_encoder).lower()}",
        *QUIET,
    ]
    result = train(load_config(None, overrides), progress=False)
    keys = _lora_keys(result.lora_path)
    assert any(k.startswith("lora_te") for k in keys) == text_encoder
    assert all(loss == loss for loss in result.losses)
