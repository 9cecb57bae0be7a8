"""The `sdlora` command: files written, generation, and one-line errors with exit code 2."""

import os
import subprocess
import sys

import pytest
from conftest import tiny_overrides
from PIL import Image

from sdlora.cli import main, parse_args
from sdlora.configfile import load_config


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_train_writes_exactly_the_run_files(style_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text("")
    # Options may come anywhere among the overrides.
    overrides = [*tiny_overrides(style_dir, out), "output.bundle=true"]
    assert main(["train", str(config), "--no-progress", *overrides]) == 0
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
    assert params.startswith("zkstripes, a circle <lora:style:0.8>\nSteps: 2, Sampler: DDIM")
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


def test_options_may_come_anywhere_among_overrides():
    args = parse_args(["train", "c.toml", "a.b=1", "--no-progress", "c.d=2"])
    assert (args.config, args.overrides, args.no_progress) == ("c.toml", ["a.b=1", "c.d=2"], True)
    args = parse_args(["demo", "a.b=1", "--out", "o", "c.d=2"])
    assert (args.out, args.overrides) == ("o", ["a.b=1", "c.d=2"])
    for argv in (["train", "c.toml", "--steps", "3"], ["train", "c.toml", "a.b=1", "--x=1"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2


@pytest.mark.parametrize(
    "case, expect",
    [
        ("unset_base", 'c.toml sets no model.base: name the base checkpoint, e.g. model.base = "'),
        ("nul_path", "dataset.cache_dir contains a NUL byte: 'cache\\x00x'"),
        ("nan", "train.max_grad_norm must be a finite number, got nan"),
        ("long_name", "output.name is 300 bytes long in UTF-8; at most 200"),
        ("rtl_name", "output.name contains a text-direction control character"),
    ],
)
def test_bad_config_values_are_one_line_before_anything_loads(
    case, expect, style_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    overrides = tiny_overrides(style_dir, out)
    config = tmp_path / "c.toml"
    config.write_text("")
    if case == "unset_base":
        overrides.remove("model.base=tiny:sd1")
    elif case == "nul_path":
        config.write_text('[dataset]\ncache_dir = "cache\\u0000x"\n')
    elif case == "nan":
        overrides.append("train.max_grad_norm=nan")
    elif case == "long_name":
        overrides.append("output.name=" + "x" * 300)
    else:
        overrides.append("output.name=gpj\u202eexe.png")
    assert main(["train", str(config), *overrides]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdlora: error: ") and expect in lines[0]
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


def test_warnings_are_one_line_each_without_library_noise(trained, style_dir, tmp_path):
    # generate: sdlora's own warning (no trigger word in the prompt); diffusers' empty
    # "should be kept in float32: []" notice at the dtype cast is muted.
    result = _run_cli(
        "generate", "--base", "tiny:sd1", "--lora", str(trained.lora_path), "--prompt",
        "a circle", "--out", str(tmp_path / "gen"), "--steps", "1", "--size", "64x64",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "sdlora: warning: the prompt has none of style's trigger words (zkstripes); "
        "add one or pass --trigger auto"
    ]
    # train: the config's Prodigy advice is one line; transformers' deprecation notice from
    # turning on gradient checkpointing is muted. Without prodigyopt the run then stops at the
    # optimizer with one error line (after the checkpointing was turned on).
    config = tmp_path / "c.toml"
    config.write_text("")
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=1) + [
        "train.optimizer=prodigy",
        "train.lr=1e-4",
        "train.gradient_checkpointing=true",
        "sample.prompts=[]",
        "sample.report_images=0",
    ]
    result = _run_cli("train", str(config), "--no-progress", *overrides)
    lines = result.stderr.splitlines()
    assert lines[0] == (
        "sdlora: warning: train.lr=0.0001 with train.optimizer=prodigy: Prodigy finds its own "
        "step size and the rate only scales it, so under 0.1 it barely learns; use 1 (the "
        "default with prodigy)"
    )
    if result.returncode == 2:
        assert lines[1:] == [
            "sdlora: error: train.optimizer=prodigy needs prodigyopt: pip install prodigyopt"
        ]
    else:
        assert result.returncode == 0 and lines[1:] == [], result.stderr


@pytest.mark.parametrize(
    "family, resolution, comment",
    [
        ("sd15", 512, "# 16 captures a style; 32+ starts memorising images"),
        ("sd21-768", 768, "# the 768-v model's native size"),
        ("sdxl", 1024, "# SDXL styles train well on the UNet alone; saves memory"),
    ],
)
def test_init_writes_the_family_preset_for_a_folder(
    family, resolution, comment, style_dir, tmp_path
):
    base = tmp_path / "models" / "base.safetensors"
    base.parent.mkdir()
    base.write_bytes(b"")
    out = tmp_path / "my-style.toml"
    argv = ["init", str(style_dir), "--family", family, "--trigger", "zkstripes"]
    assert main([*argv, "--base", str(base), "-o", str(out)]) == 0
    text = out.read_text()
    assert comment in text  # the preset's comments are kept
    config = load_config(out)
    assert config.dataset.path == str(style_dir)
    assert config.dataset.trigger == "zkstripes" and config.output.name == "zkstripes"
    assert config.model.base == str(base)
    assert config.dataset.resolution == resolution
    assert config.output.dir == str(tmp_path / "runs" / "my-style")
    assert 'path = "style"' in text  # beside the config: relative, so the pair can move


def test_init_never_replaces_a_file_and_names_what_is_wrong(
    style_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "style"]) == 0  # -o defaults to the folder's name
    written = (tmp_path / "style.toml").read_text()
    out = capsys.readouterr().out
    assert "set model.base in it" in out and "sdlora train style.toml" in out
    config = load_config(tmp_path / "style.toml")
    assert config.dataset.trigger == "zkstyle" and config.model.family is None
    for argv, message in [
        (["init", "style"], "style.toml already exists"),
        (["init", "nope", "-o", "n.toml"], "dataset folder nope does not exist"),
        (["init", "style", "-o", "style/in.toml"], "is inside the dataset folder"),
        (["init", "style", "-o", "no/such/dir/x.toml"], "folder no/such/dir does not exist"),
        (["init", "style", "--trigger", " ", "-o", "blank.toml"], "dataset.trigger is empty"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "style.toml").read_text() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style", "style.toml"]
