from pathlib import Path

import pytest

from sdlora.config import config_to_toml, load_config, parse_override
from sdlora.errors import SdloraError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_every_shipped_config_parses():
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert configs, "configs/ holds no TOML files"
    for path in configs:
        config = load_config(path)
        assert Path(config.dataset.path).is_absolute()


def test_paths_in_a_file_are_relative_to_it_and_overrides_to_cwd(tmp_path, monkeypatch):
    path = write(tmp_path, '[dataset]\npath = "imgs"\ntrigger = "zk"\n')
    monkeypatch.chdir(REPO)
    config = load_config(path, ["output.dir=out"])
    assert config.dataset.path == str(tmp_path / "imgs")
    assert config.output.dir == str(REPO / "out")


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, '[dataset]\npath = "x"\ntrigger = "zk"\n[train]\nstesp = 3\n')
    with pytest.raises(SdloraError, match=r"unknown key train\.stesp"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    path = write(tmp_path, '[dataset]\npath = "x"\ntrigger = "zk"\n[trian]\nsteps = 3\n')
    with pytest.raises(SdloraError, match=r"unknown section \[trian\]"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", r"train\.steps must be int, got str"),
        ("train.steps=1.5", r"train\.steps must be int, got float"),
        ("train.steps=true", r"train\.steps must be int, got bool"),
        ("lora.text_encoder=1", r"lora\.text_encoder must be bool"),
        ("sample.prompts=3", r"sample\.prompts must be a list of strings"),
        ("lora.alpha=-1", r"lora\.alpha must be > 0, got -1"),
        ("train.mixed_precision=fp8", r"train\.mixed_precision must be one of no, fp16, bf16"),
        ("dataset.resolution=500", r"dataset\.resolution must be a multiple of 32"),
        ("steps=3", r"must look like section\.key=value"),
        (
            "model.family=pony",
            r"Pony is a base of family sdxl; set model\.family=sdxl .*base_label=\"Pony\"",
        ),
        (
            "model.base_label=Illustrious",
            r"Illustrious.* is a base of family sdxl but model\.family is sd1",
        ),
    ],
)
def test_bad_values_are_named(tmp_path, override, message):
    path = write(tmp_path, '[dataset]\npath = "x"\ntrigger = "zk"\n[model]\nfamily = "sd1"\n')
    if override.startswith("model.family"):
        path = write(tmp_path, '[dataset]\npath = "x"\ntrigger = "zk"\n')
    with pytest.raises(SdloraError, match=message):
        load_config(path, [override])


def test_missing_dataset_path_is_explained():
    with pytest.raises(SdloraError, match="dataset.path"):
        load_config(None, ["dataset.trigger=zk"])


def test_ints_are_accepted_for_floats_and_overrides_parse_as_toml(tmp_path):
    path = write(tmp_path, '[dataset]\npath = "x"\ntrigger = "zk"\n[lora]\nalpha = 4\n')
    config = load_config(path, ['sample.prompts=["a", "b"]', "train.lr=3e-4"])
    assert config.lora.alpha == 4.0 and isinstance(config.lora.alpha, float)
    assert config.sample.prompts == ("a", "b")
    assert config.train.lr == 3e-4
    assert parse_override("dataset.trigger=zk style") == ("dataset", "trigger", "zk style")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, '[dataset]\npath = "x"\ntrigger = "z\\"k"\n'))
    again = load_config(write(tmp_path, config_to_toml(config)))
    assert again == config
