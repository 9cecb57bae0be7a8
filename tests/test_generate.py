"""Generation with LoRAs: guard first, triggers, prompt tags, grids, infotext, fusing, merge."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import random_lora
from PIL import Image

from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.export import build_metadata, save_lora
from sdlora.generate import Generator, LoraSpec, generate, placement, prompt_loras


def _make_lora(path, family="sd1", trigger="zkfoo", file_format="kohya", seed=0):
    lora = random_lora(family, alpha=4, std=0.3, seed=seed)
    meta = build_metadata(family=family, title=path.stem, rank=4, alpha=4, trigger_words=[trigger],
                          resolution=64)  # fmt: skip
    return save_lora(path, lora, family, file_format, meta, "fp32")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": _make_lora(root / "stylea.safetensors", trigger="zkfoo"),
        "b": _make_lora(
            root / "styleb.safetensors", trigger="zkbar", file_format="diffusers", seed=1
        ),
        "xl": _make_lora(root / "xl.safetensors", family="sdxl", trigger="zkxl"),
        "root": root,
    }


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_fused_matches_unfused_and_loras_change_the_image(loras):
    specs = [LoraSpec(loras["a"], 0.8), LoraSpec(loras["b"], 0.5)]
    kwargs = dict(steps=3, seed=7)
    unfused = Generator.load("tiny:sd1", specs, fuse=False).render("zkfoo, a circle", **kwargs)[0]
    fused = Generator.load("tiny:sd1", specs, fuse=True).render("zkfoo, a circle", **kwargs)[0]
    plain = Generator.load("tiny:sd1", []).render("zkfoo, a circle", **kwargs)[0]
    assert np.abs(_pixels(unfused) - _pixels(fused)).max() <= 1
    assert np.abs(_pixels(unfused) - _pixels(plain)).max() > 10


def test_sdxl_lora_with_sai_names_applies_to_tiny_sdxl(loras):
    images = generate("tiny:sdxl", [LoraSpec(loras["xl"])], prompt="zkxl, a square", steps=2)
    assert images[0].size == (64, 64)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_samplers_keep_the_base_prediction_type(sampler):
    generator = Generator.load("tiny:sd2-v", [])
    assert generator.pipeline(sampler).scheduler.config.prediction_type == "v_prediction"
    image = generator.render("a circle", steps=2, sampler=sampler)[0]
    assert "Sampler: " in image.info["parameters"]


def test_trigger_words_auto_and_warning(loras):
    with pytest.warns(UserWarning, match="none of stylea's trigger words"):
        generate("tiny:sd1", [LoraSpec(loras["a"])], prompt="a circle", steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = generate(
            "tiny:sd1", [LoraSpec(loras["a"])], prompt="a circle", steps=1, trigger="auto"
        )[0]
    assert image.info["parameters"].splitlines()[0] == "zkfoo, a circle"


def test_prompt_lora_tags_resolve_in_the_lora_dir(loras):
    prompt, specs = prompt_loras("zkfoo, a circle <lora:stylea:0.6>", loras["root"])
    assert prompt == "zkfoo, a circle"
    assert specs[0].path == loras["a"] and specs[0].scale == 0.6
    image = generate("tiny:sd1", prompt="zkfoo <lora:styleb>", lora_dir=loras["root"], steps=1)[0]
    assert 'Lora hashes: "styleb: ' in image.info["parameters"]


def test_infotext_carries_a1111_fields(loras, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    assert main(["generate", "--base", "tiny:sd1", "--lora", f"{loras['a']}:0.8",
                 "--prompt", "zkfoo, a circle", "--negative", "blurry", "--steps", "2",
                 "--cfg", "5", "--seed", "42", "--sampler", "euler_a", "--out", str(out)]) == 0  # fmt: skip
    with Image.open(next(out.glob("*.png"))) as img:
        text = img.info["parameters"]
    with safe_open(str(loras["a"]), "pt") as f:
        model_hash = f.metadata()["sshs_model_hash"]
    prompt, negative, settings = text.splitlines()
    assert prompt == "zkfoo, a circle" and negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 2, Sampler: Euler a, CFG scale: 5, Seed: 42, Size: 64x64")
    assert settings.endswith(f'Lora hashes: "stylea: {model_hash[:12]}"')


def test_grid_of_scales_is_one_labelled_image_with_the_same_seed(loras, tmp_path):
    out = tmp_path / "grid"
    assert main(["generate", "--base", "tiny:sd1", "--lora", str(loras["a"]), "--prompt", "zkfoo, a circle",
                 "--steps", "2", "--grid", "scales=0,0.5,1", "--out", str(out)]) == 0  # fmt: skip
    with Image.open(out / "grid_scales.png") as grid:
        assert grid.width == 3 * 128  # cells are enlarged to 128 px
    generator = Generator.load("tiny:sd1", [LoraSpec(loras["a"], 0.0)], fuse=False)
    zero = generator.render("zkfoo, a circle", steps=2)[0]
    plain = Generator.load("tiny:sd1", []).render("zkfoo, a circle", steps=2)[0]
    assert np.abs(_pixels(zero) - _pixels(plain)).max() <= 1  # scale 0 is the base
    assert main(["generate", "--base", "tiny:sd1", "--lora", str(loras["a"]), "--prompt", "a circle",
                 "--steps", "1", "--grid", "trigger=on,off", "--out", str(out)]) == 0  # fmt: skip
    assert (out / "grid_trigger.png").is_file()


def test_merge_writes_a_diffusers_folder_with_the_lora_fused(loras, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--base", "tiny:sd1", "--lora", f"{loras['a']}:0.8", "-o", str(out)]) == 0
    merged = Generator.load(str(out), []).render("zkfoo, a circle", steps=2)[0]
    fused = Generator.load("tiny:sd1", [LoraSpec(loras["a"], 0.8)], fuse=True).render(
        "zkfoo, a circle", steps=2
    )[0]
    assert np.abs(_pixels(merged) - _pixels(fused)).max() <= 1


def test_another_family_is_refused_before_the_base_loads(loras, monkeypatch):
    gen = sys.modules["sdlora.generate"]  # the package's `generate` name is the function

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded before the guard ran")

    monkeypatch.setattr(gen, "load_base", no_loading)
    with pytest.raises(gen.SdloraError, match="was trained for SDXL; the base is SD 1.x"):
        Generator.load("tiny:sd1", [LoraSpec(loras["xl"])])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "heun9"], "unknown sampler 'heun9'"),
        (["--lora", "nope.safetensors"], "LoRA file nope.safetensors does not exist"),
        (["--lora", "{xl}"], "was trained for SDXL"),
        (["--lora", "{a}:strong"], "LoRA scale 'strong'"),
        (
            ["--prompt", "x <lora:missing:1>", "--lora-dir", "{root}"],
            "<lora:missing> in the prompt",
        ),
    ],
    ids=["sampler", "missing", "family", "scale", "tag"],
)
def test_bad_generate_input_is_one_line_exit_2(loras, tmp_path, args, message):
    args = [a.format(**{k: str(v) for k, v in loras.items()}) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", "a circle"]
    result = subprocess.run([sys.executable, "-m", "sdlora", "generate", "--base", "tiny:sd1",
                             "--out", str(tmp_path / "o"), "--steps", "1", *args],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sdlora:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_generation_in_bf16_matches_fp32_closely(loras, family):
    spec = LoraSpec(loras["a" if family == "sd1" else "xl"])
    kwargs = dict(prompt="a circle", steps=2, size=(64, 64), trigger="off")
    full = generate(f"tiny:{family}", [spec], device="cpu", dtype="fp32", **kwargs)[0]
    half = generate(f"tiny:{family}", [spec], device="cpu", dtype="bf16", **kwargs)[0]
    a, b = (np.asarray(i, dtype=np.float32) for i in (full, half))
    assert 0 < np.abs(a - b).mean() < 8  # bf16 rounding, not a different picture


@pytest.mark.parametrize(
    "device, dtype, message",
    [("cpu", "fp16", "fp16 generation needs a CUDA device"), ("tpu", "auto", "unknown device")],
)
def test_placement_refuses_what_cannot_run(device, dtype, message):
    with pytest.raises(SdloraError, match=message):
        placement(device, dtype)
    if not torch.cuda.is_available():
        with pytest.raises(SdloraError, match="no CUDA device"):
            placement("cuda", "auto")
        assert placement() == (torch.device("cpu"), torch.float32)
