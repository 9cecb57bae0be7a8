"""Generation with LoRAs: guard first, triggers, prompt tags, grids, infotext, fusing, merge."""

import json
import re
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
from sdlora.generate import Generator, generate, placement
from sdlora.prompts import LoraSpec, prompt_loras


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
    assert image.info["parameters"].splitlines()[0] == "zkfoo, a circle <lora:stylea:1>"


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
    assert prompt == "zkfoo, a circle <lora:stylea:0.8>" and negative == "Negative prompt: blurry"
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


def _no_model_loads(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(sys.modules["sdlora.generate"], "load_base", no_loading)
    monkeypatch.setattr(sys.modules["sdlora.generate"], "base_family", no_loading)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be from 1 to 1000, got 0"),
        (["--steps", "-3"], "--steps must be from 1 to 1000, got -3"),
        (["--steps", "99999999999999999999"], "--steps must be from 1 to 1000"),
        (["--num", "0"], "--num must be from 1 to 10000, got 0"),
        (["--num", "-1"], "--num must be from 1 to 10000, got -1"),
        (["--num", str(2**64)], "--num must be from 1 to 10000"),
        (["--seed", "99999999999999999999"], "--seed must be between 0 and 2**64-1"),
        (["--seed", "-1"], "--seed must be between 0 and 2**64-1"),
        (["--seed", str(2**64 - 1), "--num", "2"], "(with --num 2: up to"),
        (["--cfg", "nan"], "--cfg must be a finite number, got nan"),
        (["--cfg=-inf"], "--cfg must be a finite number"),
        (["--size", "65536x65536"], "is 4294967296 pixels, more than 16777216"),
        (["--size", "1024x1024", "--max-pixels", "1000"], "raise --max-pixels"),
        (["--size", "0x64"], "positive multiples of 8"),
        (["--steps", "many"], "invalid int value: 'many'"),
        (["--lora", "{a}:nan"], "LoRA scale 'nan'"),
        (["--lora", "{a}:1e309"], "LoRA scale '1e309'"),
        (["--prompt", "x <lora:stylea:inf>", "--lora-dir", "{root}"], "LoRA scale 'inf'"),
        (["--prompt", "x <lora:stylea:nan>", "--lora-dir", "{root}"], "LoRA scale 'nan'"),
        (["--prompt", "x <lora:stylea:1e309>", "--lora-dir", "{root}"], "not a finite number"),
        (["--grid", "scales=0,nan"], "LoRA scale 'nan' in 'scales=nan'"),
        (["--grid", "trigger=maybe"], "--grid trigger takes on and off"),
        (["--grid", "seeds=1,2"], "--grid takes scales=... or trigger=..."),
        (["--out", "{a}"], "is a file; give a folder"),
    ],
)
def test_generate_arguments_are_checked_before_any_model_loads(
    loras, tmp_path, capsys, monkeypatch, args, message
):
    _no_model_loads(monkeypatch)
    args = [a.format(**{k: str(v) for k, v in loras.items()}) for a in args]
    defaults = {"--prompt": "a circle", "--out": str(tmp_path / "o")}
    args += [x for k, v in defaults.items() if k not in args for x in (k, v)]
    assert main(["generate", "--base", "tiny:sd1", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_max_pixels_lets_a_larger_size_through(loras, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--base", "tiny:sd1", "--prompt", "x", "--steps", "1", "--size",
                 "64x128", "--max-pixels", "8192", "--out", str(out)]) == 0  # fmt: skip
    with Image.open(out / "image_00000.png") as image:
        assert image.size == (64, 128)


def test_prompt_tags_cannot_name_files_outside_the_lora_dir(loras, tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    inside = tmp_path / "loras"
    inside.mkdir()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(loras["a"].read_bytes())
    for tag in ("../outside", str(tmp_path / "outside"), "sub/../../outside", ".."):
        with pytest.raises(SdloraError, match=f"<lora:{re.escape(tag)}> in the prompt is a path"):
            prompt_loras(f"a circle <lora:{tag}:1>", inside)
    assert prompt_loras("a circle <lora:stylea:1>", loras["root"])[1][0].path == loras["a"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_sdxl_vae_stays_in_fp32_under_bf16(loras, dtype):
    generator = Generator.load("tiny:sdxl", [LoraSpec(loras["xl"])], device="cpu", dtype=dtype)
    assert generator.base.vae.dtype == torch.float32
    assert generator.base.unet.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    image = generator.render("zkxl, a square", steps=1)[0]
    assert np.asarray(image).std() > 0
    sd1 = Generator.load("tiny:sd1", [], device="cpu", dtype="bf16")  # no force_upcast use there
    assert sd1.base.vae.dtype == torch.bfloat16


# A1111's reader of PNG infotext (modules/infotext_utils.py, parse_generation_parameters), as
# it splits the text: prompt lines, `Negative prompt:` lines, then the settings line.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def parse_a1111(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done = "", "", False
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if i == 0 else "\n") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in A1111_PARAM.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value
    return result


def test_infotext_reads_back_in_a1111_with_lora_tags_and_hashes(loras, tmp_path):
    from sdlora.stfile import sha256_after_header

    out = tmp_path / "out"
    assert main(["generate", "--base", "tiny:sd1", "--lora", f"{loras['a']}:0.8", "--prompt",
                 "zkfoo, a circle <lora:styleb:0.5>", "--lora-dir", str(loras["root"]),
                 "--negative", "blurry", "--steps", "2", "--out", str(out)]) == 0  # fmt: skip
    with Image.open(out / "image_00000.png") as img:
        info = parse_a1111(img.info["parameters"])
    # A1111's LoRA hash: sha256 of a safetensors file's bytes after its header (AutoV3).
    hashes = {loras[n].stem: sha256_after_header(loras[n].read_bytes())[:12] for n in "ab"}
    tags = A1111_EXTRA_NETWORK.findall(info["Prompt"])
    assert tags == [("lora", "stylea:0.8"), ("lora", "styleb:0.5")]
    assert A1111_EXTRA_NETWORK.sub("", info["Prompt"]).strip() == "zkfoo, a circle"
    assert info["Negative prompt"] == "blurry" and info["Steps"] == "2"
    assert info["Lora hashes"] == f"stylea: {hashes['stylea']}, styleb: {hashes['styleb']}"

    assert main(["generate", "--base", "tiny:sd1", "--lora", str(loras["a"]), "--prompt", "zkfoo",
                 "--steps", "1", "--grid", "scales=0.25,1", "--out", str(out)]) == 0  # fmt: skip
    with Image.open(out / "grid_scales.png") as grid:
        info = parse_a1111(grid.info["parameters"])
    assert info["Prompt"] == "zkfoo <lora:stylea:0.25>" and info["Steps"] == "1"
    assert info["Lora hashes"] == f"stylea: {hashes['stylea']}"


def test_merge_refuses_a_pickle_file_name(loras, tmp_path, capsys, monkeypatch):
    _no_model_loads(monkeypatch)
    for name in ("x.ckpt", "x.pt"):
        out = tmp_path / name
        assert main(["merge", "--base", "tiny:sd1", "--lora", str(loras["a"]), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "merge writes a diffusers folder or one .safetensors" in err
        assert not out.exists()


def test_merge_leaves_nothing_on_a_full_disk_or_an_overflow(loras, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", disk_full)
        out = tmp_path / "merged"
        assert main(["merge", "--base", "tiny:sd1", "--lora", str(loras["a"]), "-o", str(out)]) == 2
    assert "merged could not be written: the disk is full" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == []

    lora = random_lora("sd1", alpha=4, std=1e20)
    for _, _, module in lora.modules():
        module.down.mul_(1e20)  # each matrix finite, their product past float32's range
    huge = save_lora(tmp_path / "huge.safetensors", lora, "sd1", "kohya", {}, "fp32")
    assert main(["merge", "--base", "tiny:sd1", "--lora", str(huge), "-o", str(out)]) == 2
    assert "is not finite (the LoRAs' update is too large" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["huge.safetensors"]


@pytest.mark.parametrize("value", ["nan", "-0.1", "1.5", "inf", "x"])
def test_guidance_rescale_must_be_a_fraction(value, tmp_path, capsys, monkeypatch):
    _no_model_loads(monkeypatch)
    argv = ["generate", "--base", "tiny:sd1", "--prompt", "zk", "--out", str(tmp_path / "o"),
            "--guidance-rescale", value]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "must be a number from 0 to 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
