"""The original single-file layout: merged checkpoints load back through diffusers'
`from_single_file` with the same weights and images, and every tensor maps both ways."""

import numpy as np
import pytest
import safetensors
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlora.cli import main
from sdlora.export import build_metadata, save_lora
from sdlora.generate import Generator
from sdlora.ldm import CHECKPOINT_ARCHITECTURES, TEXT_ENCODERS, to_single_file
from sdlora.lora import random_lora
from sdlora.models import Base, config_folder, load_base
from sdlora.tiny import tiny_components


def _tiny_sdxl_folder(root):
    """tiny:sdxl with encoders of different widths (16 and 48) as a diffusers folder.

    diffusers' single-file loader tells SDXL's two encoders apart by their width (768 and
    1280 in the real model); tiny:sdxl's share 32, so this copy widens the second one.
    """
    parts = tiny_components("sdxl")
    te1 = parts["text_encoder"].config.to_dict()
    te2 = parts["text_encoder_2"].config.to_dict()
    torch.manual_seed(0)
    parts["text_encoder"] = CLIPTextModel(
        CLIPTextConfig.from_dict({**te1, "hidden_size": 16, "intermediate_size": 32})
    ).eval()
    parts["text_encoder_2"] = CLIPTextModelWithProjection(
        CLIPTextConfig.from_dict(
            {**te2, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48}
        )
    ).eval()
    unet = dict(parts["unet"].config)
    unet["projection_class_embeddings_input_dim"] = 48 + 6 * unet["addition_time_embed_dim"]
    parts["unet"] = UNet2DConditionModel.from_config(unet).eval()
    Base(name="tiny-xl", family="sdxl", **parts).pipeline().save_pretrained(root / "base")
    return str(root / "base")


def _lora_file(base_spec, path):
    base = load_base(base_spec)
    lora = random_lora(base, rank=4, alpha=4, std=0.3)
    meta = build_metadata(family=base.family, title=path.stem, rank=4, alpha=4,
                          trigger_words=["zkfoo"], resolution=64)  # fmt: skip
    return save_lora(path, lora, base.family, "kohya", meta, "fp32")


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_merged_single_file_loads_back_with_the_same_weights_and_image(family, tmp_path):
    base = _tiny_sdxl_folder(tmp_path) if family == "sdxl" else f"tiny:{family}"
    lora = _lora_file(base, tmp_path / "zkstyle.safetensors")
    folder, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    for out, extra in ((folder, []), (single, ["--dtype", "fp32"])):
        assert main(["merge", "--base", base, "--lora", f"{lora}:0.8", "-o", str(out), *extra]) == 0

    with safetensors.safe_open(single, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == CHECKPOINT_ARCHITECTURES[family]
    assert "zkstyle" in meta["modelspec.merged_from"]
    # diffusers' own single-file loader, with the merged folder as the config folder
    loaded = load_base(str(single), config_dir=folder)
    merged = load_base(str(folder))
    assert loaded.family == family
    for name in ("unet", "vae", *merged.text_encoders):
        want, got = getattr(merged, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    render = dict(prompt="zkfoo, a circle", steps=2, seed=3)
    a = Generator.load(merged).render(**render)[0]
    b = Generator.load(loaded).render(**render)[0]
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_a_merge_onto_an_existing_file_is_refused(tmp_path, capsys):
    lora = _lora_file("tiny:sd1", tmp_path / "zkstyle.safetensors")
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"mine")
    assert main(["merge", "--base", "tiny:sd1", "--lora", str(lora), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"


class Reads(dict):
    """A state dict that remembers which keys a converter read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _meta_components(family):
    """The real architecture of `family` on the meta device: shapes only, no memory."""
    folder = config_folder(family)
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        }
        for name in TEXT_ENCODERS[family]:
            parts[name] = classes[name](CLIPTextConfig.from_pretrained(folder / name))
    return parts


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_tensor_of_the_original_layout_is_written_and_none_extra(family):
    """On the real SD 1.5 / 2.x / XL architectures: diffusers' own converters rebuild every
    diffusers tensor, with its shape, from the written keys, and read every written key."""
    parts = _meta_components(family)
    state = Reads(to_single_file(family, parts))
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, parts["unet"].config),
        "vae": convert_ldm_vae_checkpoint(state, parts["vae"].config),
    }
    for name, (kind, prefix) in TEXT_ENCODERS[family].items():
        if kind == "clip":
            te = convert_ldm_clip_checkpoint(state)
        else:
            te = convert_open_clip_checkpoint(parts[name], state, prefix=prefix)
        if name == "text_encoder":  # transformers 5 dropped this level from CLIPTextModel
            te = {k.removeprefix("text_model."): v for k, v in te.items()}
        converted[name] = te
    expected_numel = 0
    for name, model in parts.items():
        want = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        got = converted[name]
        assert want.keys() == got.keys(), (name, sorted(want.keys() ^ got.keys())[:5])
        assert all(want[k].shape == got[k].shape for k in want), name
        expected_numel += sum(v.numel() for v in want.values())
    assert state.read == set(state)
    assert sum(v.numel() for v in state.values()) == expected_numel  # nothing written twice
