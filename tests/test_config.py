import dataclasses
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sdlora.config import SECTIONS
from sdlora.configfile import config_to_toml, load_config, parse_override, replace
from sdlora.errors import SdloraError

REPO = Path(__file__).resolve().parent.parent
MINIMAL = '[model]\nbase = "tiny:sd1"\n[dataset]\npath = "x"\ntrigger = "zk"\n'


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
    path = write(tmp_path, '[model]\nbase = "tiny:sd1"\n[dataset]\npath = "imgs"\ntrigger = "zk"\n')
    monkeypatch.chdir(REPO)
    config = load_config(path, ["output.dir=out"])
    assert config.dataset.path == str(tmp_path / "imgs")
    assert config.output.dir == str(REPO / "out")


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, MINIMAL + "[train]\nstesp = 3\n")
    with pytest.raises(SdloraError, match=r"unknown key train\.stesp"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    path = write(tmp_path, MINIMAL + "[trian]\nsteps = 3\n")
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
    path = write(tmp_path, MINIMAL.replace("[model]\n", '[model]\nfamily = "sd1"\n'))
    if override.startswith("model.family"):
        path = write(tmp_path, MINIMAL)
    with pytest.raises(SdloraError, match=message):
        load_config(path, [override])


def test_missing_dataset_path_is_explained():
    with pytest.raises(SdloraError, match="dataset.path"):
        load_config(None, ["dataset.trigger=zk"])


def test_ints_are_accepted_for_floats_and_overrides_parse_as_toml(tmp_path):
    path = write(tmp_path, MINIMAL + "[lora]\nalpha = 4\n")
    config = load_config(path, ['sample.prompts=["a", "b"]', "train.lr=3e-4"])
    assert config.lora.alpha == 4.0 and isinstance(config.lora.alpha, float)
    assert config.sample.prompts == ("a", "b")
    assert config.train.lr == 3e-4
    assert parse_override("dataset.trigger=zk style") == ("dataset", "trigger", "zk style")


ODD = (
    "two\nlines",
    "a\ttab",
    'say "hi"',
    "back\\slash \\n",
    "ünïcødé ✓ 日本語 🎨",
    "ctrl \x01\x1b\x7f\x85 end",
    "\u202eright-to-left",
    "'''",
    '"""',
)


@pytest.mark.parametrize("odd", ODD, ids=range(len(ODD)))
def test_odd_strings_round_trip(tmp_path, odd):
    config = load_config(write(tmp_path, MINIMAL))
    config = replace(
        config,
        dataset={"trigger": f"zk{odd}", "caption_template": f"{{trigger}}, {odd}"},
        sample={"prompts": (odd, f"{{trigger}} {odd}", "")},
        output={"name": 'zk "style" ü' if "\n" in odd else "zk's style"},
    )
    again = load_config(write(tmp_path, config_to_toml(config)))
    assert again == config


def test_every_shipped_config_round_trips(tmp_path):
    for path in sorted((REPO / "configs").glob("*.toml")):
        config = load_config(path)
        assert load_config(write(tmp_path, config_to_toml(config))) == config, path.name


def test_a_config_without_a_base_says_how_to_name_one(tmp_path):
    path = write(tmp_path, '[dataset]\npath = "x"\ntrigger = "zk"\n')
    with pytest.raises(SdloraError, match=r"run\.toml sets no model\.base: name the base") as e:
        load_config(path)
    assert 'model.base = "path/to/model.safetensors"' in str(e.value)
    assert "`micro` / `tiny:sd1`" in str(e.value)
    with pytest.raises(SdloraError, match="sets no model.base"):
        load_config(None, ["dataset.path=x", "dataset.trigger=zk"])
    with pytest.raises(SdloraError, match="model.base is empty: name the base"):
        load_config(path, ["model.base="])


def test_alpha_follows_the_rank_unless_set(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_config(path).lora.alpha == 16.0
    config = load_config(path, ["lora.rank=32"])
    assert config.lora.alpha == 32.0  # scale alpha / rank stays 1
    assert "alpha = 32.0" in config_to_toml(config)  # the run folder records the number
    assert load_config(path, ["lora.rank=32", "lora.alpha=8"]).lora.alpha == 8.0


def test_prodigy_defaults_to_lr_1_and_a_low_rate_is_warned(tmp_path, recwarn):
    path = write(tmp_path, MINIMAL)
    assert load_config(path).train.lr == 1e-4
    config = load_config(path, ["train.optimizer=prodigy"])
    assert config.train.lr == 1.0 and config.train.te_lr == 1.0
    assert "lr = 1.0" in config_to_toml(config)
    assert load_config(path, ["train.optimizer=prodigy", "train.lr=0.5"]).train.lr == 0.5
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"^train\.lr=0\.0001 with train\.optimizer=prodigy"):
        load_config(path, ["train.optimizer=prodigy", "train.lr=1e-4"])
    with pytest.warns(UserWarning, match=r"^train\.text_encoder_lr=5e-05 with"):
        load_config(path, ["train.optimizer=prodigy", "train.text_encoder_lr=5e-5"])


@pytest.mark.parametrize(
    "override",
    [
        "train.max_grad_norm=nan",
        "train.lr=inf",
        "train.lr=-inf",
        "train.text_encoder_lr=nan",
        "train.noise_offset=1e309",
        "train.min_snr_gamma=+inf",
        "train.prior_weight=nan",
        "lora.alpha=inf",
        "sample.cfg=nan",
        "dataset.caption_dropout=nan",
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, override):
    key = override.partition("=")[0].replace(".", r"\.")
    with pytest.raises(SdloraError, match=rf"^{key} must be a finite number, got"):
        load_config(write(tmp_path, MINIMAL), [override])


def test_non_finite_numbers_in_a_file_are_refused(tmp_path):
    with pytest.raises(SdloraError, match=r"train\.weight_decay must be a finite number"):
        load_config(write(tmp_path, MINIMAL + "[train]\nweight_decay = nan\n"))


def test_integers_beyond_64_bits_are_refused(tmp_path):
    with pytest.raises(SdloraError, match=r"train\.seed must fit in 64 bits"):
        load_config(write(tmp_path, MINIMAL), ["train.seed=99999999999999999999"])


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "is empty"),
        (".", "is not a file name"),
        ("..", "is not a file name"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a\x00b", "NUL byte"),
        ("two\nlines", "control character"),
        ("a\tb", "control character"),
        ("a\x1bb", "control character"),
        ("a\u2028b", "control character"),
        ("gpj\u202eexe.png", "text-direction control"),
        ("a\u2066b", "text-direction control"),
        ("x" * 201, "201 bytes long in UTF-8; at most 200"),
        ("é" * 101, "202 bytes long in UTF-8"),  # 101 characters
    ],
)
def test_bad_output_names_are_refused_before_anything_loads(tmp_path, name, problem):
    text = MINIMAL + f"[output]\nname = {_toml_string(name)}\n"
    with pytest.raises(SdloraError, match=rf"^output\.name .*{problem}"):
        load_config(write(tmp_path, text))


def test_long_and_unicode_output_names_that_fit_are_kept(tmp_path):
    for name in ("x" * 200, "é" * 100, "zk style, v2 (ü)", ".hidden-ish", "日本"):
        config = load_config(write(tmp_path, MINIMAL), [f"output.name={name}"])
        assert config.output.name == name
        assert len(f"{name}-step000001.safetensors".encode()) < 255


@pytest.mark.parametrize(
    "section, key",
    [
        ("dataset", "path"),
        ("dataset", "cache_dir"),
        ("output", "dir"),
        ("model", "base"),
        ("model", "config_dir"),
        ("lora", "init_from"),
        ("train", "resume"),
        ("dataset", "trigger"),
    ],
)
def test_a_nul_byte_in_a_path_is_one_error_naming_the_key(tmp_path, section, key):
    raw = tomllib.loads(MINIMAL)
    raw.setdefault(section, {})[key] = "a\x00b"
    text = "".join(
        f"[{s}]\n" + "".join(f"{k} = {_toml_string(v)}\n" for k, v in values.items())
        for s, values in raw.items()
    )
    with pytest.raises(SdloraError, match=rf"^{section}\.{key} contains a NUL byte"):
        load_config(write(tmp_path, text))


def test_undecodable_command_line_bytes_are_one_error(tmp_path):
    with pytest.raises(SdloraError, match=r"sample\.prompts is not valid UTF-8"):
        load_config(write(tmp_path, MINIMAL), ['sample.prompts=["caf\udce9"]'])


def test_clip_skip_is_at_least_1_or_unset(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_config(path).train.clip_skip is None
    assert load_config(path, ["train.clip_skip=2"]).train.clip_skip == 2
    with pytest.raises(SdloraError, match=r"train\.clip_skip must be > 0, got 0"):
        load_config(path, ["train.clip_skip=0"])


def test_every_config_key_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in readme, f"{section}.{f.name}"


def test_the_python_floor_is_one_every_dependency_supports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    floor = SpecifierSet(project["project"]["requires-python"])
    (lowest,) = [s.version for s in floor if s.operator == ">="]
    for dependency in project["project"]["dependencies"]:
        name = Requirement(dependency).name
        needs = metadata.metadata(name).get("Requires-Python") or ""
        assert SpecifierSet(needs).contains(lowest), f"{name} needs Python {needs}"
    target = project["tool"]["ruff"]["target-version"]
    assert target == "py" + lowest.replace(".", ""), target


def _toml_string(text: str) -> str:
    """A TOML basic string, every character outside printable ASCII escaped."""
    body = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return f'"{body}"'
