"""The shipped micro model: its weights, its measured quality, the pretraining script, the
learning report and prior preservation on it."""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora import micro, shapes
from sdlora.configfile import load_config
from sdlora.errors import SdloraError
from sdlora.models import load_base
from sdlora.report import (
    bootstrap_error,
    paired_scores,
    palette,
    standard_error,
    strip_trigger,
    style_scores,
)
from sdlora.train import check_resolution

REPO = Path(__file__).resolve().parent.parent
BANDS = REPO / "datasets_examples" / "bands"
AGREEMENT_PROMPTS = 48
MINIMAL = ["model.base=tiny:sd1", "dataset.path=x", "dataset.trigger=zk"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro_base():
    return load_base("micro")


@pytest.fixture(scope="module")
def agreement(micro_base):
    """Overall and per-claim agreement of the shipped model with prompts of its vocabulary."""
    prompts = shapes.check_prompts(AGREEMENT_PROMPTS, seed=7)
    overall, per_claim, _ = micro.agreement(micro_base.pipeline(), prompts, seed=0)
    return overall, per_claim


def test_checker_reads_drawn_scenes():
    rng = random.Random(3)
    scenes = [shapes.random_scene(rng) for _ in range(200)]
    agree = [all(shapes.check(s.caption(), shapes.draw(s, rng)).values()) for s in scenes]
    assert sum(agree) >= 198


def test_checker_disagrees_with_a_wrong_prompt():
    scene = shapes.Scene("red", "square", "left", "blue")
    image = shapes.draw(scene, random.Random(0))
    result = shapes.check("a green triangle on the right on a white background", image)
    assert not any(result.values())


def test_vocabulary_words_are_single_tokens_and_the_trigger_is_not():
    tokenizer = micro.tokenizer()
    for word in shapes.WORDS:
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    assert len(tokenizer.tokenize("zkbands")) > 1


def test_shipped_weights_load_as_sd1_and_stay_small(micro_base):
    assert micro_base.name == "micro"
    assert micro_base.family == "sd1"
    assert micro_base.unet.config.cross_attention_dim == micro.CROSS_ATTENTION_WIDTH
    assert micro_base.unet.dtype == torch.float32
    assert micro_base.scheduler.config.prediction_type == "epsilon"
    size = sum(p.stat().st_size for p in micro.WEIGHTS.rglob("*.safetensors"))
    assert size <= 30 * 2**20


def test_shipped_model_draws_the_colours_backgrounds_shapes_and_places_it_is_told(agreement):
    _, per_claim = agreement
    for claim in ("colour", "background", "shape", "position"):
        assert per_claim[claim] >= 0.8, per_claim


def test_shipped_model_agrees_with_every_claim_of_80_percent_of_prompts(agreement):
    overall, per_claim = agreement
    assert overall >= 0.8, per_claim


def test_position_words_move_the_shape(micro_base):
    # Same seeds, only the place changes: the shape must follow the words, not the noise.
    pipe = micro_base.pipeline()
    seen = {}
    for place, words in shapes.POSITIONS.items():
        prompts = [f"a red square {words} on a blue background"] * 8
        _, per_claim, _ = micro.agreement(pipe, prompts, seed=0)
        seen[place] = per_claim["position"]
    assert min(seen.values()) >= 0.75, seen


def test_resolution_must_suit_the_base(micro_base):
    check_resolution(micro_base, 32)  # x4 VAE, three UNet downsamplings
    with pytest.raises(SdloraError, match="dataset.resolution 32"):
        check_resolution(load_base("tiny:sd1"), 32)


def test_prior_and_report_options_are_validated():
    with pytest.raises(SdloraError, match="train.prior_images"):
        load_config(None, [*MINIMAL, "train.prior_images=-1"])
    with pytest.raises(SdloraError, match="sample.report_images"):
        load_config(None, [*MINIMAL, "sample.report_images=-1"])
    with pytest.raises(SdloraError, match="dataset.resolution"):
        load_config(None, [*MINIMAL, "dataset.resolution=48"])


def test_style_scores_measure_along_the_base_to_style_line():
    base, style = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    halfway = np.array([0.5, 0.5])
    scores = style_scores(base, halfway, base, base, style)
    assert scores == {"shift": pytest.approx(0.5), "drift": 0, "change": 0}
    scores = style_scores(base, base, base, style, style)
    assert scores == {"shift": 0, "drift": pytest.approx(1), "change": pytest.approx(1)}
    # A change across the style axis is a change, not a drift towards the style.
    across = base + np.array([1.0, 1.0])  # at right angles to style - base
    scores = style_scores(base, base, base, across, style)
    assert scores["drift"] == pytest.approx(0)
    assert scores["change"] == pytest.approx(1)


def paired(base_without: np.ndarray, lora_without: np.ndarray) -> dict:
    """paired_scores of one 2-D statistic whose style set sits at (0, 1) and whose base draws
    everything at (0, 0) with the trigger (so the axis is (0, 1), of length 1)."""
    n = len(base_without)
    zeros = np.zeros((n, 2))
    sets = {
        "base_with": {"s": [zeros]},
        "lora_with": {"s": [zeros]},
        "base_without": {"s": [base_without]},
        "lora_without": {"s": [lora_without]},
    }
    return paired_scores(sets, {"s": [np.tile([0.0, 1.0], (n, 1))]})["s"]


def test_the_drift_is_the_typical_image_and_re_drawn_images_are_counted():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(48, 2))
    # 40 images kept, 8 re-drawn: jumps of 1.3 along the axis, six of them away from the style.
    redrawn = base.copy()
    redrawn[:8, 1] += np.array([-1.3] * 6 + [1.3] * 2)
    scores = paired(base, redrawn)
    assert scores["drift_mean_without_trigger"] == pytest.approx(-4 * 1.3 / 48, abs=1e-4)
    assert scores["drift_without_trigger"] == 0  # the typical image did not move
    assert scores["redrawn_without_trigger"] == pytest.approx(8 / 48, abs=1e-4)
    # Even with 20 of 48 re-drawn, 14 of them away from the style: still the kept images' move.
    many = base.copy()
    many[:20, 1] += np.array([-1.3] * 14 + [1.3] * 6)
    assert paired(base, many)["drift_without_trigger"] == 0
    # A style that leaks moves most images: the drift sees it (here 0.3 for 40 of 48).
    leaked = base.copy()
    leaked[8:, 1] += 0.3
    scores = paired(base, leaked)
    assert scores["drift_without_trigger"] == pytest.approx(0.3)
    assert scores["redrawn_without_trigger"] == 0
    assert scores["drift_se"] >= 0


def test_the_errors_count_how_each_prompts_images_vary_not_how_prompts_differ():
    rng = np.random.default_rng(0)
    prompts = ["a blue circle", "a white square"] * 24
    # Per prompt, shifts near 0 (the first prompt) and near 1.2: a spread within prompts of 0.1.
    shift = np.where(np.array(prompts) == "a blue circle", 0.0, 1.2) + rng.normal(0, 0.1, 48)
    assert standard_error(shift) > 0.08  # over all images: mostly the two prompts' gap
    assert standard_error(shift, prompts) == pytest.approx(0.1 / 48**0.5, rel=0.25)
    assert bootstrap_error(shift, np.mean, prompts) == pytest.approx(0.1 / 48**0.5, rel=0.3)
    assert standard_error(shift, ["one"] * 48) == pytest.approx(standard_error(shift))
    assert standard_error(shift[:2], prompts[:2]) == 0  # no prompt drawn twice: no error known
    with pytest.raises(ValueError, match="3 labels for 48 values"):
        standard_error(shift, prompts[:3])


def test_palette_is_a_normalised_histogram():
    hist = palette(shapes.draw(shapes.Scene("red", "circle", "left", "blue"), random.Random(0)))
    assert hist.shape == (64,)
    assert hist.sum() == pytest.approx(1)
    assert strip_trigger("zkbands, a red circle", "zkbands") == "a red circle"


def test_micro_run_writes_a_learning_report_in_range(tmp_path):
    from sdlora import train

    data = tmp_path / "bands"
    shutil.copytree(BANDS, data)
    config = load_config(
        REPO / "configs" / "demo.toml",
        [
            f"dataset.path={data}",
            f"output.dir={tmp_path / 'run'}",
            "train.steps=4",
            "train.prior_images=4",
            "sample.steps=4",
            "sample.report_images=4",
        ],
    )
    result = train(config, progress=False)
    report = result.learning
    assert (result.run_dir / "learning_report.json").is_file()
    assert (result.run_dir / "ab_grid.png").is_file()
    assert report["statistic"] == "vae_encoder_gram"
    assert set(report["statistics"]) == {"vae_encoder_gram", "palette_histogram_4x4x4"}
    for scores in (report, *report["statistics"].values()):
        assert -1 <= scores["style_shift_with_trigger"] <= 2
        assert -1 <= scores["drift_without_trigger"] <= 2
        assert 0 <= scores["change_without_trigger"] <= 3
        assert scores["redrawn_without_trigger"] in (0, 0.25, 0.5, 0.75, 1)  # of 4 images
    gram = report["statistics"]["vae_encoder_gram"]
    assert gram["style_shift_with_trigger"] == report["style_shift_with_trigger"]
    assert len(gram["parts"]) == 3  # one per encoder block
    assert gram["style_shift_se"] >= 0 and gram["drift_se"] >= 0
    assert len(report["seeds"]) == len(report["prompts_with_trigger"]) == 4
    assert all(p.startswith("zkbands, ") for p in report["prompts_with_trigger"])


def test_pretrain_script_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "pretrain_micro", REPO / "scripts" / "pretrain_micro.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "micro"
    script.main(
        [
            f"--out={out}",
            f"--work={tmp_path / 'work'}",
            "--images=32",
            "--vae-steps=2",
            "--unet-steps=2",
            "--batch=4",
            "--checkpoint-every=2",
            "--eval-prompts=1",
            "--eval-steps=2",
        ]
    )
    base = load_base(str(out))
    assert base.family == "sd1"
    assert (tmp_path / "work" / "log.jsonl").is_file()
