"""The `sdlora` command: files written, generation, and one-line errors with exit code 2."""

import os
import subprocess
import sys

import pytest
from conftest import tiny_overrides
from PIL import Image

from sdlora.cli import main


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_train_writes_exactly_the_run_files(style_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text("")
    overrides = [*tiny_overrides(style_dir, out), "output.bundle=true"]
    assert main(["train", str(config), *overrides, "--no-progress"]) == 0
    files = _files(out)
    events = [f for f in files if f.startswith("logs/events.out.tfevents")]
    assert len(events) == 1
    assert [f for f in files if f not in events] == [
        "ab_grid.png",
        "bundle/README.md",
        "bundle/ab_grid.png",
        "bundle/civitai.json",
        "bundle/diffusers/pytorch_lora_weights.safetensors",
        "bundle/loss.png",
        "bundle/previews/01_base.png",
        "bundle/previews/01_lora.png",
        "bundle/style.safetensors",
        "checkpoints.json",
        "config.toml",
        "learning_report.json",
        "log.jsonl",
        "loss.png",
        "progress.png",
        "run.json",
        "samples/step_000000.png",
        "samples/step_000003.png",
        "style.safetensors",
    ]
    assert "style.safetensors" in capsys.readouterr().out
    # The resolved config reproduces the run's settings.
    assert "steps = 3" in (out / "config.toml").read_text()


def test_generate_writes_pngs_with_infotext(trained, tmp_path):
    out = tmp_path / "gen"
    code = main(
        [
            "generate",
            "--base",
            "tiny:sd1",
            "--lora",
            f"{trained.lora_path}:0.8",
            "--prompt",
            "zkstripes, a circle",
            "--out",
            str(out),
            "--steps",
            "2",
            "--num",
            "2",
            "--size",
            "64x64",
        ]
    )
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as img:
        assert img.size == (64, 64)
        params = img.info["parameters"]
    assert params.startswith("zkstripes, a circle\nSteps: 2, Sampler: DDIM")
    assert 'Lora hashes: "style: ' in params


def _run_cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sdlora", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "case", ["missing_folder", "empty_folder", "unknown_key", "wrong_type", "no_base"]
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, style_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(style_dir, out)
    expect = {
        "missing_folder": "dataset folder",
        "empty_folder": "no usable images",
        "unknown_key": "unknown key train.stepz",
        "wrong_type": "train.steps must be int",
        "no_base": "base 'no/such/model' does not exist",
    }[case]
    if case == "missing_folder":
        overrides.append(f"dataset.path={tmp_path / 'nope'}")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        overrides.append(f"dataset.path={tmp_path / 'empty'}")
    elif case == "unknown_key":
        overrides.append("train.stepz=3")
    elif case == "wrong_type":
        overrides.append("train.steps=three")
    else:
        overrides.append("model.base=no/such/model")
    config = tmp_path / "c.toml"
    config.write_text("")
    result = _run_cli("train", str(config), *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdlora: error:") and expect in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_training_never_writes_into_the_dataset_folder(style_dir, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in style_dir.iterdir()}
    config = tmp_path / "c.toml"
    config.write_text("")
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=1)
    assert main(["train", str(config), *overrides, "--no-progress"]) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in style_dir.iterdir()} == before


def test_commands_print_no_library_noise(trained):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # as a user's
    result = _run_cli("inspect", str(trained.lora_path), env=env)
    assert result.returncode == 0
    assert result.stderr == ""  # e.g. transformers' torchvision notice about CLIP's image processor
    assert "family:      sd1" in result.stdout
