"""The publish bundle: model card, previews with generation data, civitai.json; `sdlora push`."""

import hashlib
import json
import re

import pytest
import safetensors
import yaml
from conftest import random_lora
from PIL import Image

from sdlora.bundle import write_bundle
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.export import build_metadata, save_kohya
from sdlora.lorafile import read_lora
from sdlora.stfile import sha256_after_header

# How A1111 reads the settings line of its infotext (modules/infotext_utils.py).
SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """Prompt, negative prompt and settings of an A1111 `parameters` text."""
    *prompt_lines, settings = text.strip().split("\n")
    prompt, negative = [], []
    for line in prompt_lines:
        (negative if negative or line.startswith("Negative prompt:") else prompt).append(line)
    out = {"Prompt": "\n".join(prompt)}
    if negative:
        out["Negative prompt"] = "\n".join(negative).removeprefix("Negative prompt:").strip()
    for key, value in SETTING.findall(settings):
        out[key.strip()] = value.strip().strip('"')
    return out


def front_matter(text: str) -> tuple[dict, str]:
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "style-bundle"
    return write_bundle(trained.run_dir, out, license="mit")


def test_bundle_holds_both_formats_previews_card_and_civitai_form(bundle):
    kohya = bundle / "style.safetensors"
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert names == ["README.md", "ab_grid.png", "civitai.json",
                     "diffusers/pytorch_lora_weights.safetensors", "loss.png",
                     "previews/01_base.png", "previews/01_lora.png", "style.safetensors"]  # fmt: skip
    with safetensors.safe_open(kohya, "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    a, b = read_lora(kohya), read_lora(bundle / "diffusers/pytorch_lora_weights.safetensors")
    assert b.file_format == "diffusers" and a.count("unet") == b.count("unet") > 0


def test_model_card_parses_and_points_at_real_files(bundle):
    card, body = front_matter((bundle / "README.md").read_text())
    assert "base_model" not in card  # tiny:sd1 is no published base
    assert card["instance_prompt"] == "zkstripes" and card["license"] == "mit"
    assert {"lora", "text-to-image", "stable-diffusion", "template:sd-lora"} <= set(card["tags"])
    assert [w["output"]["url"] for w in card["widget"]] == ["previews/01_lora.png"]
    assert card["widget"][0]["text"] == "zkstripes, a circle"
    for link in re.findall(r"\]\(([^)]+)\)", body):
        assert (bundle / link).is_file(), link
    assert "<lora:style:1>" in body and "drift without trigger" in body


def test_previews_carry_infotext_that_reads_back(bundle):
    model_hash = sha256_after_header((bundle / "style.safetensors").read_bytes())
    lora = parse_infotext(Image.open(bundle / "previews/01_lora.png").info["parameters"])
    assert lora["Prompt"] == "zkstripes, a circle <lora:style:1>"
    assert lora["Seed"] == "0" and lora["Steps"] == "2" and lora["Size"] == "64x64"
    assert lora["Lora hashes"] == f"style: {model_hash[:12]}"
    base = parse_infotext(Image.open(bundle / "previews/01_base.png").info["parameters"])
    assert base["Prompt"] == "zkstripes, a circle" and base["Seed"] == "0"
    assert "Lora hashes" not in base


def test_civitai_form_hashes_match_the_file(bundle):
    form = json.loads((bundle / "civitai.json").read_text())
    data = (bundle / "style.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest().upper()
    (file,) = form["files"]
    assert file["name"] == "style.safetensors"
    assert file["hashes"]["SHA256"] == sha and file["hashes"]["AutoV2"] == sha[:10]
    assert file["hashes"]["AutoV3"] == sha256_after_header(data)[:12].upper()
    assert form["type"] == "LORA" and form["baseModel"] == "Other"  # tiny:sd1
    assert form["trainedWords"] == ["zkstripes"] and form["recommendedWeight"] == 1.0
    assert [i["file"] for i in form["images"]] == ["previews/01_lora.png"]


def test_a_lone_sdxl_file_with_a_community_label_is_bundled_under_that_name(tmp_path):
    meta = build_metadata(family="sdxl", title="My Style!", rank=4, alpha=2, trigger_words=["zk"],
                          resolution=1024, base_label="pony")  # fmt: skip
    path = save_kohya(tmp_path / "my style.safetensors", random_lora("sdxl"), "sdxl", meta)
    out = write_bundle(path, previews=False)
    assert out == tmp_path / "my style-bundle"
    assert (out / "My_Style.safetensors").is_file()
    form = json.loads((out / "civitai.json").read_text())
    assert form["baseModel"] == "Pony" and form["trainedWords"] == ["zk"]
    card, _ = front_matter((out / "README.md").read_text())
    assert card["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"stable-diffusion-xl", "pony"} <= set(card["tags"])
    assert card["license"] == "openrail++" and "widget" not in card


def test_an_existing_bundle_is_kept_unless_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["bundle", str(trained.run_dir), "-o", str(out), "--no-previews"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(SdloraError, match="neither a LoRA file nor a run folder"):
        write_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no half-made folder


def test_push_dry_run_lists_files_and_sizes(bundle, capsys):
    assert main(["push", str(bundle), "--repo", "someone/style", "--dry-run"]) == 0
    out = capsys.readouterr().out
    size = (bundle / "style.safetensors").stat().st_size
    assert f"{size:,}  style.safetensors" in out
    assert "previews/01_lora.png" in out and "nothing uploaded" in out


def test_push_refuses_offline_and_unauthenticated(bundle, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(bundle), "--repo", "someone/style"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert main(["push", str(bundle), "--repo", "someone/style"]) == 2
    assert "not logged in" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo", "someone/style", "--dry-run"]) == 2
    assert "is not a bundle" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_a_loha_or_lokr_bundle_holds_the_kohya_file_only(algo, tmp_path):
    # diffusers reads no LoHa/LoKr layout: the bundle (also written at the end of a run) leaves
    # its diffusers form and the card's diffusers line out instead of failing.
    from test_comfy_keys import write

    lora = write(tmp_path / "style.safetensors", "sd1", algo)
    bundle = write_bundle(lora, tmp_path / "bundle", previews=False)
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert names == ["README.md", "civitai.json", "t.safetensors"]  # named by ss_output_name
    assert read_lora(bundle / "t.safetensors").count("unet") == read_lora(lora).count("unet")
    _, body = front_matter((bundle / "README.md").read_text())
    assert "ComfyUI" in body and "load_lora_weights" not in body
