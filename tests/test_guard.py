"""The version guard on every pair of families, and on real-architecture shapes."""

import itertools
import warnings

import pytest
import torch
from conftest import random_lora

from sdlora.guard import IncompatibleLora, check_compatible
from sdlora.lora import (
    Lora,
    LoraModule,
)
from sdlora.models import load_base
from sdlora.tiny import TINY_FAMILIES

TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd2-v": "SD 2.x", "sdxl": "SDXL"}


def _lora_for(family: str) -> Lora:
    lora = random_lora(family, rank=2, alpha=2, std=0.0)
    lora.metadata = {"modelspec.prediction_type": "v" if family == "sd2-v" else "epsilon",
                     "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v",
                                               "sdxl": "sdxl_base_v1-0"}[family]}  # fmt: skip
    return lora


@pytest.fixture(scope="module")
def bases():
    return {family: load_base(f"tiny:{family}") for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def loras():
    return {family: _lora_for(family) for family in TINY_FAMILIES}


@pytest.mark.parametrize(
    "base_family, lora_family", list(itertools.product(TINY_FAMILIES, repeat=2))
)
def test_guard_on_every_pair_of_families(bases, loras, base_family, lora_family):
    base, lora = bases[base_family], loras[lora_family]
    if base_family == lora_family:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_compatible(base, lora) == []
    elif {base_family, lora_family} == {"sd2", "sd2-v"}:
        with pytest.warns(UserWarning, match="prediction types differ"):
            notes = check_compatible(base, lora)
        assert len(notes) == 1
    else:
        with pytest.raises(IncompatibleLora) as e:
            check_compatible(base, lora, "style.safetensors")
        message = str(e.value)
        assert message.startswith(f"style.safetensors was trained for {TITLES[lora_family]}")
        assert f"the base is {TITLES[base_family]}" in message


def test_missing_modules_and_shape_mismatches_are_named(bases, loras):
    lora = loras["sd1"]
    extra = Lora({**lora.components, "unet": {**lora.components["unet"],
                  "conv_in": LoraModule(torch.zeros(2, 4, 3, 3), torch.zeros(32, 2, 1, 1), 2.0),
                  "down_blocks.9.attn.to_q": LoraModule(torch.zeros(2, 8), torch.zeros(8, 2), 2.0)}},
                 metadata=lora.metadata)  # fmt: skip
    with pytest.raises(
        IncompatibleLora,
        match=r"1 module\(s\) the base tiny:sd1 lacks \(first: unet:down_blocks\.9",
    ):
        check_compatible(bases["sd1"], extra)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    wrong = Lora({"unet": {path: LoraModule(torch.zeros(2, 32), torch.zeros(64, 2), 2.0)}},
                 metadata=lora.metadata)  # fmt: skip
    with pytest.raises(
        IncompatibleLora,
        match=r"differ in shape \(first: unet:down_blocks\.0.*LoRA \[64, 32\], base \[32, 32\]",
    ):
        check_compatible(bases["sd1"], wrong)


def test_a_tiny_sd1_lora_does_not_fit_real_sd15(loras):
    """Same family, other shapes: the structural check refuses."""
    from diffusers import UNet2DConditionModel

    from sdlora.models import Base, config_folder

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_folder("sd1") / "unet")
        )
    base = Base(name="sd15", family="sd1", unet=unet, vae=None, text_encoder=torch.nn.Module(),
                tokenizer=None, scheduler=None)  # fmt: skip
    with pytest.raises(IncompatibleLora, match="differ in shape"):
        check_compatible(base, Lora({"unet": loras["sd1"].components["unet"]}))


def test_family_from_metadata_only_warns(bases):
    meta = {"ss_base_model_version": "sd_v1"}
    # Width 7 matches no family: only the metadata says SD 1.x.
    lora = Lora({"unet": {"conv_in": LoraModule(torch.zeros(2, 4, 3, 3), torch.zeros(32, 2, 1, 1), 2.0)}},
                metadata=meta)  # fmt: skip
    with pytest.warns(UserWarning, match="metadata only"):
        check_compatible(bases["sd1"], lora)
