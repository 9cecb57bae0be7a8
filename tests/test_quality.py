"""Training-quality options: each changes the loss, the noise or the saved weights the way it
says, tested on the maths directly and in a short run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora import load_config, train
from sdlora.checkpoint import complete_checkpoints
from sdlora.dataset import scan_folder
from sdlora.errors import SdloraError
from sdlora.lora import extract_lora
from sdlora.lorafile import read_lora
from sdlora.masks import load_mask
from sdlora.step import (
    diffusion_loss,
    elementwise_loss,
    loss_target,
    make_noise,
    prediction_loss,
)


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
        load_config(None, [f"dataset.path={tmp_path}", "dataset.trigger=zk", "train.loss=l1",
                           "model.base=tiny:sd1"])  # fmt: skip


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
    assert meta["ss_masked_loss"] == "False"


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
                           "model.base=tiny:sd1", "train.multires_noise_discount=0"])  # fmt: skip
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + [
        "train.multires_noise_iterations=6", "sample.prompts=[]", "sample.report_images=0",
    ]  # fmt: skip
    result = train(load_config(None, overrides), progress=False)
    assert all(loss == loss for loss in result.losses)
    with safe_open(result.lora_path, "pt") as f:
        assert f.metadata()["ss_multires_noise_iterations"] == "6"


def _ema_config(style_dir, out, steps, *extra):
    overrides = tiny_overrides(style_dir, out, steps) + [
        "train.ema_decay=0.5", "output.dtype=fp32", "sample.prompts=[]",
        "sample.report_images=0", "dataset.flip=true", "train.noise_offset=0.05", *extra,
    ]  # fmt: skip
    return load_config(None, overrides)


def _averages(raw: list[dict]) -> list[dict]:
    """The moving average after each of the weights in `raw` (one per step, decay 0.5)."""
    # diffusers' EMAModel: decay min(0.5, (1 + k) / (10 + k)) at its k-th update, 0 at the first
    averages = [dict(raw[0])]
    for k, weights in enumerate(raw[1:], start=1):
        decay = min(0.5, (1 + k) / (10 + k))
        averages.append({n: decay * averages[-1][n] + (1 - decay) * weights[n] for n in weights})
    return averages


def test_the_saved_lora_is_the_moving_average_of_the_weights(style_dir, tmp_path):
    out = tmp_path / "run"
    result = train(_ema_config(style_dir, out, 3, "train.save_every=1", "train.keep_last=3"),
                   progress=False)  # fmt: skip
    raw = [load_file(p / "lora.safetensors") for p in complete_checkpoints(out)]  # steps 1-3
    expected = _averages(raw)[-1]
    trained = {f"unet.{n}": p for n, p in result.base.unet.named_parameters() if p.requires_grad}
    trained |= {f"text_encoder.{n}": p for n, p in result.base.text_encoder.named_parameters()
                if p.requires_grad}  # fmt: skip
    assert trained.keys() == expected.keys()
    for name, param in trained.items():
        assert torch.allclose(param.detach().cpu(), expected[name], atol=1e-6), name
    assert any(not torch.equal(raw[-1][n], expected[n]) for n in expected)  # not the last step
    saved = read_lora(result.lora_path)
    assert saved.metadata["ss_ema_decay"] == "0.5"
    for component, model in (
        ("unet", result.base.unet),
        ("text_encoder", result.base.text_encoder),
    ):
        for path, module in extract_lora(model).items():
            stored = saved.components[component][path]
            assert torch.equal(stored.down.reshape(module.down.shape), module.down)
            assert torch.equal(stored.up.reshape(module.up.shape), module.up)


def test_with_a_moving_average_every_measurement_is_of_the_average(
    style_dir, tmp_path, monkeypatch
):
    """Validation (and with it the checkpoints' judgement) measures the weights the run saves,
    the average, not the weights of the last step; the trained weights go on after."""
    from sdlora.evaluate import Evaluation

    measured, validate = {}, Evaluation.validate

    def spy(self, step):
        lora = {n: p.detach().clone() for n, p in self.base.unet.named_parameters()
                if p.requires_grad}  # fmt: skip
        measured[step] = lora
        return validate(self, step)

    monkeypatch.setattr(Evaluation, "validate", spy)
    out = tmp_path / "run"
    train(_ema_config(style_dir, out, 3, "train.save_every=1", "train.keep_last=3"),
          progress=False)  # fmt: skip
    raw = [load_file(p / "lora.safetensors") for p in complete_checkpoints(out)]  # steps 1-3
    averages = _averages(raw)
    assert sorted(measured) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        for name, value in measured[step].items():
            assert torch.allclose(value, averages[step - 1][f"unet.{name}"], atol=1e-6), name
    differs = [not torch.equal(measured[2][n], raw[1][f"unet.{n}"]) for n in measured[2]]
    assert any(differs)  # the average at step 2 is not step 2's weights


def test_a_resumed_run_continues_the_moving_average_exactly(style_dir, tmp_path):
    straight = tmp_path / "straight"
    train(_ema_config(style_dir, straight, 4, "train.save_every=2"), progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    (resumed / "style.safetensors").unlink()
    config = _ema_config(style_dir, resumed, 4, "train.save_every=2", "train.resume=latest")
    train(config, progress=False)
    a, b = load_file(straight / "style.safetensors"), load_file(resumed / "style.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(run / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
              for run in (straight, resumed)]  # fmt: skip
    assert states[0]["ema"]["optimization_step"] == states[1]["ema"]["optimization_step"] == 4
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            states[0]["ema"]["shadow_params"], states[1]["ema"]["shadow_params"], strict=True
        )
    )
    # without an EMA in the checkpoint, resuming with one is refused in words
    plain = tmp_path / "plain"
    train(
        load_config(
            None,
            tiny_overrides(style_dir, plain, 2)
            + ["train.save_every=2", "sample.prompts=[]", "sample.report_images=0"],
        ),
        progress=False,
    )
    (plain / "style.safetensors").unlink()
    with pytest.raises(SdloraError, match="holds no EMA"):
        train(_ema_config(style_dir, plain, 3, "train.resume=latest"), progress=False)


def test_masked_loss_has_zero_gradient_where_the_mask_is_black():
    noise = torch.randn(2, 4, 8, 8)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, 4:] = 0  # the right half does not count
    _loss(pred, noise, torch.tensor([10, 500]), mask=mask).backward()
    assert torch.all(pred.grad[..., 4:] == 0)
    assert torch.all(pred.grad[..., :4] != 0)
    unmasked = _loss(pred.detach(), noise, torch.tensor([10, 500]), mask=torch.ones(2, 1, 8, 8))
    assert torch.allclose(unmasked, _loss(pred.detach(), noise, torch.tensor([10, 500])))


def _image_with_mask(folder, name="wide.png"):
    """A 96x64 image whose mask is white on its left half (x < 48)."""
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(
        folder / name
    )
    mask = np.zeros((32, 48), dtype=np.uint8)  # drawn at half size: it is scaled to the image
    mask[:, :24] = 255
    Image.fromarray(mask).save(folder / name.replace(".png", ".mask.png"))


def test_the_mask_follows_the_images_bucket_crop_and_flip(tmp_path):
    _image_with_mask(tmp_path / "set")
    scan = scan_folder(tmp_path / "set", "zk", resolution=64)
    assert [e.path.name for e in scan.examples] == ["wide.png"]  # the mask is no image
    example = scan.examples[0]
    assert example.mask == tmp_path / "set" / "wide.mask.png" and example.bucket == (64, 64)
    # resized 96x64 covers 64x64 as it is; the centre crop starts at x = 16, so the white
    # part x < 48 becomes crop columns 0-31: latent columns 0-3
    mask = load_mask(example.mask, example.size, example.bucket, (0, 16), False, (8, 8))
    assert mask.shape == (1, 8, 8)
    # (the mask's upscaling blurs its edge a little: column 3 and 4 are not exactly 1 and 0)
    assert torch.all(mask[..., :4] > 0.9) and torch.all(mask[..., 4:] < 0.1)
    assert torch.all(mask[..., :3] == 1) and torch.all(mask[..., 5:] == 0)
    flipped = load_mask(example.mask, example.size, example.bucket, (0, 16), True, (8, 8))
    assert torch.equal(flipped, mask.flip(-1))


def test_a_run_with_a_mask_trains_and_a_broken_mask_is_named(style_dir, tmp_path):
    _image_with_mask(style_dir)
    # seven images, once each per epoch, one per step: the masked one is drawn
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=7) + [
        "train.batch_size=1", "sample.prompts=[]", "sample.report_images=0",
        "dataset.repeats=1",
    ]  # fmt: skip
    result = train(load_config(None, overrides), progress=False)
    assert all(loss == loss for loss in result.losses)
    assert read_lora(result.lora_path).metadata["ss_masked_loss"] == "True"
    (style_dir / "wide.mask.png").write_bytes(b"not a png")
    scan = scan_folder(style_dir, "zk", resolution=64)
    example = next(e for e in scan.examples if e.mask)
    with pytest.raises(SdloraError, match="wide.mask.png: the loss mask cannot be read"):
        load_mask(example.mask, example.size, example.bucket, (0, 0), False, (8, 8))


def test_target_unet_replaces_the_noise_as_target():
    noise, pred, target = (torch.randn(2, 4, 8, 8) for _ in range(3))
    timesteps, scheduler = torch.tensor([10, 500]), _scheduler()
    chosen = loss_target(scheduler, torch.zeros_like(noise), noise, timesteps, noise,
                         target_unet=lambda noisy, t: target)  # fmt: skip
    loss = prediction_loss(pred, chosen, scheduler, timesteps)
    assert torch.allclose(loss, ((pred - target) ** 2).mean())


def _prior_stepper(prior_target: str):
    """A Stepper on tiny:sd1 with a fresh UNet LoRA and four random prior latents."""
    from accelerate import Accelerator

    from sdlora.cache import TextCache
    from sdlora.checkpoint import Rngs
    from sdlora.lora import UNET_ATTENTION, inject_lora
    from sdlora.models import load_base
    from sdlora.prior import PriorSet
    from sdlora.step import Stepper, encode_text

    base = load_base("tiny:sd1")
    inject_lora(base.unet, 4, 4.0, UNET_ATTENTION)
    captions = ["a red circle", "a blue square"] * 2
    prior = PriorSet(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), captions)
    if prior_target == "base":
        prior.base_text = TextCache(lambda c: encode_text(base, c, "cpu"))
        prior.base_text(sorted({*captions, ""}))
    config = load_config(None, ["model.base=tiny:sd1", "dataset.path=x", "dataset.trigger=t",
                                "train.prior_images=4",
                                f"train.prior_target={prior_target}"]).train  # fmt: skip
    text_for = TextCache(lambda c: encode_text(base, c, "cpu"))
    stepper = Stepper(base, Accelerator(cpu=True), {"unet": base.unet}, text_for, prior,
                      Rngs.seeded(0), config)  # fmt: skip
    return base, stepper


def test_prior_target_base_is_zero_exactly_while_the_lora_changes_nothing():
    base, stepper = _prior_stepper("base")
    lora = [p for n, p in base.unet.named_parameters() if "lora_" in n]
    assert (
        stepper._loss([stepper._prior_part(4)]).item() == 0.0
    )  # lora_B starts at zero: the base itself
    _, noise_stepper = _prior_stepper("noise")
    assert (
        noise_stepper._loss([noise_stepper._prior_part(4)]).item() > 0.01
    )  # the noise target is never met
    with torch.no_grad():
        for p in lora:
            p.add_(torch.randn_like(p) * 0.1)
    loss = stepper._loss([stepper._prior_part(4)])
    loss.backward()
    assert loss.item() > 0
    assert all(p.requires_grad for p in lora)  # switched back on after the base's pass
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_prior_batches_caption_a_share_with_the_empty_prompt():
    from sdlora.prior import PriorSet

    prior = PriorSet(torch.zeros(3, 4, 8, 8), ["a", "b", "c"])
    _, captions = prior.batch(2000, torch.Generator().manual_seed(0), unconditional=0.25)
    assert captions.count("") / 2000 == pytest.approx(0.25, abs=0.03)
    assert {"a", "b", "c"} <= set(captions)
    _, plain = prior.batch(8, torch.Generator().manual_seed(1))
    idx = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    assert plain == [prior.captions[i] for i in idx.tolist()]  # off: the stream is unchanged


def test_prior_options_are_checked(style_dir):
    minimal = [f"dataset.path={style_dir}", "dataset.trigger=zk", "model.base=tiny:sd1"]
    with pytest.raises(SdloraError, match="train.prior_target"):
        load_config(None, [*minimal, "train.prior_target=class"])
    with pytest.raises(SdloraError, match="train.prior_unconditional.*1.5"):
        load_config(None, [*minimal, "train.prior_unconditional=1.5"])


def test_base_target_prior_trains_sdxl_with_the_empty_prompt(style_dir, tmp_path):
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + [
        "model.base=tiny:sdxl", "train.prior_images=2", "train.prior_target=base",
        "train.prior_unconditional=0.5", "sample.prompts=[]", "sample.report_images=0",
    ]  # fmt: skip
    result = train(load_config(None, overrides), progress=False)
    assert len(result.losses) == 2 and all(0 < loss < 10 for loss in result.losses)


def test_one_pass_of_style_and_prior_images_equals_two():
    from sdlora.checkpoint import Rngs
    from sdlora.step import Batch

    base, stepper = _prior_stepper("base")
    lora = [p for n, p in base.unet.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(3)) * 0.1)
    batch = Batch(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4)),
                  ["zk, a circle"] * 4, [(64, 64, 0, 0, 64, 64)] * 4, ["a.png"] * 4)  # fmt: skip

    def loss_and_grads(joint: bool):
        stepper.rngs = Rngs.seeded(0)
        parts = [stepper._style_part(batch), stepper._prior_part(4)]
        losses = [stepper._loss(parts)] if joint else [stepper._loss([p]) for p in parts]
        loss = sum(losses)
        loss.backward()
        grads = [p.grad.clone() for p in lora]
        for p in lora:
            p.grad = None
        return loss.item(), grads

    joint, separate = loss_and_grads(True), loss_and_grads(False)
    assert joint[0] == pytest.approx(separate[0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(joint[1], separate[1], strict=True))
