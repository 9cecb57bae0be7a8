"""The learning report's style score means something on the micro model: it orders LoRAs of
known strength (one LoRA at scale 0, 0.5 and 1; fewer and more steps of one run).
(Telling two style sets apart needs fully trained LoRAs: benchmarks/style_score.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sdlora.configfile import load_config
from sdlora.generate import Generator
from sdlora.gram import gram_features
from sdlora.models import load_base
from sdlora.prompts import LoraSpec
from sdlora.report import (
    GRAM,
    PALETTE,
    features,
    paired_scores,
    render_sets,
    report_prompts,
    style_set,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "datasets_examples"
IMAGES = 12
STEPS = (30, 90)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro():
    return load_base("micro")


@pytest.fixture(scope="module")
def styles(micro):
    return {
        "bands": style_set(micro, EXAMPLES / "bands", "zkbands", 32),
    }


def train_on(name: str, trigger: str, tmp: Path) -> Path:
    """The demo config on example set `name`, shortened: LoRA files after STEPS[0] and
    STEPS[1] steps; the run folder."""
    from sdlora import train

    shutil.copytree(EXAMPLES / name, tmp / name)
    config = load_config(
        REPO / "configs" / "demo.toml",
        [
            f"dataset.path={tmp / name}",
            f"dataset.trigger={trigger}",
            f"output.name={name}",
            f"output.dir={tmp / 'run'}",
            f"train.steps={STEPS[1]}",
            f"train.save_every={STEPS[0]}",
            "output.step_loras=true",
            "train.prior_images=0",
            "sample.prompts=[]",
            "sample.report_images=0",
            "output.bundle=false",
        ],
    )
    return train(config, progress=False).run_dir


@pytest.fixture(scope="module")
def bands_run(tmp_path_factory):
    return train_on("bands", "zkbands", tmp_path_factory.mktemp("bands"))


def lora_sets(lora: Path, scale: float, captions, trigger: str = "zkbands") -> dict:
    """The report's four sets for `lora` at `scale` (the base's and the LoRA's), as features."""
    base = Generator.load(load_base("micro"), [LoraSpec(lora, scale)]).base
    prompts, with_trigger = report_prompts(captions, trigger, IMAGES)
    seeds = [1000 + i for i in range(IMAGES)]
    sets = render_sets(base, prompts, with_trigger, seeds, 10, 5.0, 32)
    return {k: features(base, v) for k, v in sets.items()}


def scores_of(lora: Path, scale: float, captions, axes: dict) -> dict:
    """Both statistics of `lora` at `scale` on the axis of each style set in `axes`."""
    feats = lora_sets(lora, scale, captions)
    return {name: paired_scores(feats, style) for name, style in axes.items()}


def test_gram_features_per_encoder_block(micro, styles):
    images = styles["bands"][0][:3]
    parts = gram_features(micro.vae, images, batch=2)
    channels = micro.vae.config.block_out_channels
    assert [p.shape for p in parts] == [(3, c * (c + 1) // 2) for c in channels]
    alone = gram_features(micro.vae, images[:1])
    for part, one in zip(parts, alone, strict=True):  # batching changes nothing
        np.testing.assert_allclose(part[:1], one, rtol=1e-4, atol=1e-6)


def test_the_style_score_orders_loras_of_known_strength(bands_run, styles, micro):
    images, captions = styles["bands"]
    axes = {"bands": features(micro, images)}
    lora = bands_run / "bands.safetensors"
    by_scale = {s: scores_of(lora, s, captions, axes)["bands"] for s in (0.0, 0.5, 1.0)}
    early = bands_run / f"bands-step{STEPS[0]:06d}.safetensors"
    fewer = scores_of(early, 1.0, captions, axes)["bands"]
    for name in (GRAM, PALETTE):
        shift = {s: by_scale[s][name]["style_shift_with_trigger"] for s in by_scale}
        assert shift[0.0] == 0.0 and by_scale[0.0][name]["drift_without_trigger"] == 0.0
        assert shift[0.0] < shift[0.5] < shift[1.0] - 0.2, (name, shift)
        assert fewer[name]["style_shift_with_trigger"] < shift[1.0] - 0.1, (name, fewer)
    assert by_scale[1.0][GRAM]["style_shift_with_trigger"] > 0.5
