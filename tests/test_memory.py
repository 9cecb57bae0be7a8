"""The GPU memory estimate on the real architectures (built on the meta device: no weights)."""

from __future__ import annotations

import pytest

from sdlora.memory import GIB, Parameters, meta_parameters, training_memory


def test_real_architectures_have_their_published_sizes():
    sd1 = meta_parameters("sd1", rank=16, unet_targets="attention", text_encoder=False)
    assert sd1.frozen["unet"] == pytest.approx(859.5e6, rel=0.01)  # SD 1.5's UNet: 860M
    assert sd1.frozen["text_encoder"] == pytest.approx(123.1e6, rel=0.01)  # CLIP ViT-L/14
    assert sd1.frozen["vae"] == pytest.approx(83.7e6, rel=0.01)
    xl = meta_parameters("sdxl", rank=16, unet_targets="attention", text_encoder=False)
    assert xl.frozen["unet"] == pytest.approx(2.567e9, rel=0.01)  # SDXL's UNet: 2.6B
    assert xl.frozen["text_encoder_2"] == pytest.approx(694.7e6, rel=0.01)  # OpenCLIP bigG


def test_the_lora_count_is_what_training_injects():
    # SD 1.5, rank 16 on to_q/k/v/out: 16 transformer blocks, each with a self- and a
    # cross-attention; every adapted Linear adds rank * (in + out).
    sd1 = meta_parameters("sd1", rank=16, unet_targets="attention", text_encoder=False)
    assert sd1.trained == 797_184 * 4  # 3.19M, the usual size of a rank-16 SD 1.5 LoRA (12 MB)
    with_te = meta_parameters("sd1", rank=16, unet_targets="attention", text_encoder=True)
    # CLIP ViT-L: 12 layers x 4 projections of 768x768
    assert with_te.trained - sd1.trained == 12 * 4 * 16 * (768 + 768)
    wider = meta_parameters("sd1", rank=32, unet_targets="all-linear", text_encoder=False)
    assert wider.trained > 2 * sd1.trained


def test_the_estimate_adds_up_and_moves_the_right_way():
    sd1 = meta_parameters("sd1", rank=16, unet_targets="attention", text_encoder=True)
    fp16 = training_memory(sd1, "sd1", "fp16", "adamw", 512, 1, False)
    assert fp16.weights == 2 * sum(sd1.frozen.values())
    assert fp16.adapter == 8 * sd1.trained and fp16.optimizer == 8 * sd1.trained
    assert fp16.total == (
        fp16.weights + fp16.adapter + fp16.optimizer + fp16.activations + fp16.runtime
    )
    assert 4 * GIB < fp16.total < 9 * GIB  # what SD 1.5 LoRA training at 512 is known to take
    fp32 = training_memory(sd1, "sd1", "no", "adamw", 512, 1, False)
    assert fp32.weights == 2 * fp16.weights and fp32.activations == 2 * fp16.activations
    checkpointed = training_memory(sd1, "sd1", "fp16", "adamw", 512, 1, True)
    assert checkpointed.activations < fp16.activations / 2
    batch4 = training_memory(sd1, "sd1", "fp16", "adamw", 512, 4, False)
    assert batch4.activations == 4 * fp16.activations
    big = training_memory(sd1, "sd1", "fp16", "adamw", 768, 1, False)
    assert big.activations == pytest.approx(2.25 * fp16.activations)
    eight_bit = training_memory(sd1, "sd1", "fp16", "adamw8bit", 512, 1, False)
    assert eight_bit.optimizer == fp16.optimizer // 4
    assert "GiB of GPU memory (estimate)" in fp16.text()


def test_sdxl_keeps_its_vae_in_float32_and_needs_more():
    xl = meta_parameters("sdxl", rank=16, unet_targets="attention", text_encoder=False)
    est = training_memory(xl, "sdxl", "bf16", "adamw", 1024, 1, True)
    half = 2 * sum(n for name, n in xl.frozen.items() if name != "vae")
    assert est.weights == half + 4 * xl.frozen["vae"]
    assert 8 * GIB < est.total < 16 * GIB  # SDXL LoRA with checkpointing fits a 16 GB card
    sd1 = training_memory(Parameters({"unet": 10}, 0), "sd1", "bf16", "adamw", 1024, 1, True)
    assert est.activations == sd1.activations  # the same pixels: the same rough figure


def test_the_train_screen_states_the_estimate_for_the_device(tmp_path):
    from sdlora.configfile import load_config
    from sdlora.studio.runs import memory_text

    def config(base, *more):
        keys = [f"model.base={base}", f"dataset.path={tmp_path}", "dataset.trigger=zk"]
        return load_config(None, [*keys, f"output.dir={tmp_path / 'run'}", *more])

    xl = config("random:sdxl", "dataset.resolution=1024", "train.mixed_precision=bf16",
                "train.gradient_checkpointing=true")  # fmt: skip
    text = memory_text(xl, "cuda:1")
    assert text.startswith("memory on cuda:1: ≈ ") and "GiB of GPU memory (estimate)" in text
    assert memory_text(xl, "cpu") == (
        "memory: CPU training; the GPU memory estimate does not apply (n/a)"
    )
    assert "built-in test base" in memory_text(config("tiny:sd1"), "cuda:0")
