"""Training-quality options: each changes the loss, the noise or the saved weights the way it
says, tested on the maths directly and in a short run."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from safetensors import safe_open

from sdlora import load_config, train
from sdlora.errors import SdloraError
from sdlora.step import diffusion_loss, elementwise_loss, make_noise


class FixedUnet:
    """A stand-in UNet that predicts `pred` whatever it is given."""

    def __init__(self, pred: torch.Tensor):
        self.pred = pred

    def __call__(self, noisy, timesteps, text, added_cond_kwargs=None):
        return type("Out", (), {"sample": self.pred})()


def _scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type,
    )  # fmt: skip


def _loss(pred, noise, timesteps, scheduler=None, **options):
    latents = torch.zeros_like(noise)
    return diffusion_loss(
        FixedUnet(pred), scheduler or _scheduler(), latents, None, noise, timesteps, **options
    )


def test_mse_is_the_mean_squared_error_of_the_noise():
    noise, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    loss = _loss(pred, noise, torch.tensor([10, 500]))
    assert torch.allclose(loss, ((pred - noise) ** 2).mean())


def test_huber_is_mse_for_small_errors_and_pulls_boundedly_on_outliers():
    target = torch.zeros(1000)
    small = torch.full((1000,), 1e-3)
    mse, huber = elementwise_loss(small, target), elementwise_loss(small, target, "huber", 0.1)
    assert torch.allclose(huber, mse, rtol=1e-3)
    pred = torch.zeros(1000)
    pred[0] = 10.0  # one badly predicted element
    grads = {}
    for kind in ("mse", "huber", "smooth_l1"):
        p = pred.clone().requires_grad_(True)
        elementwise_loss(p, target, kind, 0.1).sum().backward()
        grads[kind] = float(p.grad[0])
    assert grads["mse"] == pytest.approx(20.0)  # 2d: grows with the error
    assert grads["huber"] == pytest.approx(0.2, rel=1e-3)  # at most 2c
    assert grads["smooth_l1"] == pytest.approx(2.0, rel=1e-3)  # at most 2
    assert torch.allclose(
        elementwise_loss(pred, target, "smooth_l1", 0.1),
        elementwise_loss(pred, target, "huber", 0.1) / 0.1,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights_each_sample_by_snr(prediction_type):
    scheduler = _scheduler(prediction_type)
    timesteps = torch.tensor([0, 10, 500, 999])
    noise, pred = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    plain = [_loss(pred[i : i + 1], noise[i : i + 1], timesteps[i : i + 1], scheduler)
             for i in range(4)]  # fmt: skip
    debiased = _loss(pred, noise, timesteps, scheduler, debiased=True)
    snr = compute_snr(scheduler, timesteps).clamp(max=1000)
    assert float(compute_snr(scheduler, timesteps[:1])) > 1000  # the cap matters at t=0
    weight = 1 / (snr + 1) if prediction_type == "v_prediction" else snr.rsqrt()
    assert torch.allclose(debiased, (torch.stack(plain) * weight).mean(), rtol=1e-5)


def test_unknown_loss_is_refused(tmp_path):
    with pytest.raises(SdloraError, match="train.loss must be one of"):
        load_config(None, [f"dataset.path={tmp_path}", "dataset.trigger=zk", "train.loss=l1"])


def test_loss_options_train_and_are_recorded(style_dir, tmp_path):
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + [
        "train.loss=huber", "train.debiased_estimation=true", "sample.prompts=[]",
        "sample.report_images=0",
    ]  # fmt: skip
    result = train(load_config(None, overrides), progress=False)
    assert all(loss == loss for loss in result.losses)
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_loss_type"] == "huber" and meta["ss_debiased_estimation"] == "True"


def _neighbour_correlation(noise: torch.Tensor) -> float:
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_multires_noise_adds_low_frequencies_at_unit_variance():
    shape = (4, 4, 32, 32)
    plain = make_noise(shape, torch.Generator().manual_seed(0))
    pyramid = make_noise(shape, torch.Generator().manual_seed(0), multires_iterations=6,
                         multires_discount=0.8)  # fmt: skip
    assert abs(_neighbour_correlation(plain)) < 0.05  # white: neighbours independent
    assert _neighbour_correlation(pyramid) > 0.2  # coarse levels: neighbours alike
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-5)
    # per-image, per-channel means spread far more than white noise's (≈ 1/32)
    assert float(pyramid.mean(dim=(2, 3)).std()) > 3 * float(plain.mean(dim=(2, 3)).std())
    again = make_noise(shape, torch.Generator().manual_seed(0), multires_iterations=6,
                       multires_discount=0.8)  # fmt: skip
    assert torch.equal(pyramid, again)  # drawn from the run's generator only: resumable


def test_multires_noise_options_are_checked_and_recorded(style_dir, tmp_path):
    with pytest.raises(SdloraError, match="multires_noise_discount"):
        load_config(None, [f"dataset.path={style_dir}", "dataset.trigger=zk",
                           "train.multires_noise_discount=0"])  # fmt: skip
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + [
        "train.multires_noise_iterations=6", "sample.prompts=[]", "sample.report_images=0",
    ]  # fmt: skip
    result = train(load_config(None, overrides), progress=False)
    assert all(loss == loss for loss in result.losses)
    with safe_open(result.lora_path, "pt") as f:
        assert f.metadata()["ss_multires_noise_iterations"] == "6"
