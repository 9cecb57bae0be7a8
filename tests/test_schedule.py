"""v-prediction and zero terminal SNR: detected from the base (or set), trained with, recorded
in the LoRA, and matched by every sampler, so a v-prediction SDXL base gives images."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import safetensors.torch
from conftest import tiny_overrides
from diffusers import DDIMScheduler
from PIL import Image

from sdlora import load_config, train
from sdlora.errors import SdloraError
from sdlora.generate import Generator, match_schedule
from sdlora.guard import check_prediction
from sdlora.ldm import to_single_file
from sdlora.lora import Lora
from sdlora.lorafile import read_lora
from sdlora.models import Base, load_base
from sdlora.schedule import with_schedule
from sdlora.tiny import tiny_components

VPRED_ZTSNR = ["model.prediction_type=v_prediction", "train.zero_terminal_snr=true"]


def _pixel_std(image) -> float:
    return float(np.asarray(image, dtype=np.float32).std())


def test_zero_terminal_snr_rescales_the_betas_and_samplers_start_at_pure_noise():
    base = load_base("tiny:sdxl", prediction_type="v_prediction", zero_terminal_snr=True)
    assert base.family == "sdxl" and base.prediction_type == "v_prediction"
    assert float(base.scheduler.alphas_cumprod[-1]) == 0.0  # the last step is pure noise
    sampler = DDIMScheduler.from_config(base.scheduler.config)
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == 999  # trailing spacing: sampling starts there
    plain = DDIMScheduler.from_config(load_base("tiny:sdxl").scheduler.config)
    plain.set_timesteps(4)
    assert int(plain.timesteps[0]) < 999 and float(plain.alphas_cumprod[-1]) > 0


def test_zero_terminal_snr_with_epsilon_prediction_is_refused():
    with pytest.raises(SdloraError, match="needs a v-prediction base"):
        load_base("tiny:sdxl", zero_terminal_snr=True)


def test_sd2_family_follows_the_prediction_type_and_contradictions_are_refused(tmp_path):
    assert load_base("tiny:sd2", prediction_type="v_prediction").family == "sd2-v"
    assert load_base("tiny:sd2-v", prediction_type="epsilon").family == "sd2"
    with pytest.raises(SdloraError, match="contradicts model.prediction_type"):
        load_config(None, [f"dataset.path={tmp_path}", "model.family=sd2", "model.base=tiny:sd2",
                           "model.prediction_type=v_prediction"])  # fmt: skip
    with pytest.raises(SdloraError, match="model.prediction_type must be one of"):
        load_config(None, [f"dataset.path={tmp_path}", "model.prediction_type=v",
                           "model.base=tiny:sd1"])  # fmt: skip


def test_a_single_file_states_its_prediction_type_in_modelspec_metadata(tmp_path):
    parts = tiny_components("sd1")
    Base(name="tiny", family="sd1", **parts).pipeline().save_pretrained(tmp_path / "config")
    state = to_single_file("sd1", parts)
    plain, vpred = tmp_path / "plain.safetensors", tmp_path / "vpred.safetensors"
    safetensors.torch.save_file(state, plain)
    safetensors.torch.save_file(state, vpred, metadata={"modelspec.prediction_type": "v"})
    base = load_base(str(plain), config_dir=tmp_path / "config")
    assert base.prediction_type == "epsilon" and not base.prediction_stated
    base = load_base(str(vpred), config_dir=tmp_path / "config")
    assert base.prediction_type == "v_prediction" and base.prediction_stated
    base = load_base(str(plain), config_dir=tmp_path / "config", prediction_type="v_prediction")
    assert base.prediction_type == "v_prediction" and base.prediction_stated


@pytest.fixture(scope="module")
def vpred_run(tmp_path_factory):
    """A 3-step run on tiny:sdxl made v-prediction with zero terminal SNR."""
    from conftest import EXAMPLES

    root = tmp_path_factory.mktemp("vpred")
    folder = root / "style"
    folder.mkdir()
    for image in sorted(EXAMPLES.glob("*.png"))[:4]:
        (folder / image.name).write_bytes(image.read_bytes())
    overrides = tiny_overrides(folder, root / "run") + VPRED_ZTSNR + [
        "model.base=tiny:sdxl", "sample.report_images=0", "output.dtype=fp32",
    ]  # fmt: skip
    return train(load_config(None, overrides), progress=False)


def test_vpred_sdxl_with_zero_terminal_snr_trains_and_samples_images(vpred_run):
    assert all(np.isfinite(vpred_run.losses))
    meta = read_lora(vpred_run.lora_path).metadata
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_v_parameterization"] == "True" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    generator = Generator(vpred_run.base, [])
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        image = generator.render("zkstripes", steps=4, size=(64, 64), sampler=sampler)[0]
        assert _pixel_std(image) > 5.0, sampler  # an image, not a flat or black frame


def test_the_same_sampler_with_epsilon_settings_gives_black_frames(vpred_run):
    """What the check above tells apart: the zero-SNR schedule sampled as epsilon divides by
    zero at the first step, and the pipeline returns a flat black frame."""
    base = vpred_run.base
    saved = base.scheduler
    config = {**saved.config, "prediction_type": "epsilon"}
    try:
        base.scheduler = type(saved).from_config(config)  # bypasses with_schedule's refusal
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' "invalid value in cast"
            image = Generator(base, []).render("zkstripes", steps=4, size=(64, 64))[0]
    finally:
        base.scheduler = saved
    assert _pixel_std(image) < 1.0


def test_generate_takes_the_prediction_type_from_the_lora_when_the_base_cannot_tell(vpred_run):
    lora = read_lora(vpred_run.lora_path)
    base = load_base("tiny:sdxl")
    assert check_prediction(base, lora, "style")  # v-pred LoRA on an epsilon base: a note
    base.prediction_stated = False  # as a single file without metadata
    match_schedule(base, [lora], None, False)
    assert base.prediction_type == "v_prediction"
    assert base.scheduler.config.rescale_betas_zero_snr
    assert check_prediction(base, lora, "style") == []
    stated = load_base("tiny:sdxl")  # the base says epsilon: it stays so, with a warning
    match_schedule(stated, [Lora(metadata={"modelspec.prediction_type": "v"})], None, False)
    assert stated.prediction_type == "epsilon"


def test_generate_warns_when_prediction_types_differ(vpred_run, tmp_path, capsys):
    from sdlora.cli import main

    code = main(["generate", "--base", "tiny:sdxl", "--lora", str(vpred_run.lora_path),
                 "--prompt", "zkstripes", "--steps", "2", "--size", "64x64",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert any(line.startswith("sdlora: warning: ") and
               "trained on a v_prediction base; tiny:sdxl is epsilon" in line
               for line in warned)  # fmt: skip


def test_with_schedule_keeps_a_zero_snr_config():
    base = load_base("tiny:sdxl", prediction_type="v_prediction", zero_terminal_snr=True)
    again = with_schedule(base.scheduler.config)
    assert float(again.alphas_cumprod[-1]) == 0.0


def test_bundle_previews_draw_the_base_as_the_lora_was_trained(vpred_run, tmp_path):
    from sdlora.bundle import render_previews

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained on a v_prediction base.*")
        shown = render_previews("tiny:sdxl", vpred_run.lora_path, ["zkstripes"], tmp_path,
                                weight=1.0, steps=4, cfg=5.0, seed=0, device="cpu")  # fmt: skip
    assert len(shown) == 2
    for png in sorted(tmp_path.glob("*.png")):
        assert _pixel_std(Image.open(png)) > 5.0, png.name
