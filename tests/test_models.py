"""Loading bases: single-file checkpoints offline, config folders, real-architecture LoRAs."""

import json

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.errors import SdloraError
from sdlora.export import save_lora
from sdlora.ldm import to_single_file
from sdlora.lora import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    Lora,
    extract_lora,
    inject_lora,
    lora_layers,
)
from sdlora.models import (
    CONFIG_FOLDERS,
    Base,
    base_family,
    checkpoint_family,
    config_folder,
    load_base,
)
from sdlora.tiny import tiny_components


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """tiny:sd1 written as an original single-file checkpoint, plus its config folder."""
    root = tmp_path_factory.mktemp("single")
    parts = tiny_components("sd1")
    safetensors.torch.save_file(to_single_file("sd1", parts), root / "tiny-sd1.safetensors")
    Base(name="tiny", family="sd1", **parts).pipeline().save_pretrained(root / "config")
    for weights in (root / "config").rglob("*.safetensors"):
        weights.unlink()  # a config folder holds configs and tokenizers only
    return root / "tiny-sd1.safetensors", root / "config", parts


def test_single_file_checkpoint_loads_offline_with_a_config_folder(tiny_checkpoint):
    path, config, parts = tiny_checkpoint
    assert checkpoint_family(path).family == "sd1"
    assert base_family(str(path)) == "sd1"
    base = load_base(str(path), config_dir=config)
    assert base.family == "sd1" and base.prediction_type == "epsilon"
    for name in ("unet", "vae", "text_encoder"):
        want, got = parts[name].state_dict(), getattr(base, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k].reshape(want[k].shape)) for k in want), name


def test_training_starts_from_a_single_file_checkpoint(tiny_checkpoint, style_dir, tmp_path):
    from conftest import tiny_overrides

    from sdlora import load_config, train

    path, config, _ = tiny_checkpoint
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=1)
    overrides += [f"model.base={path}", f"model.config_dir={config}"]
    result = train(load_config(None, overrides), progress=False)
    assert result.lora_path.is_file()


@pytest.mark.parametrize("family", sorted(CONFIG_FOLDERS))
def test_shipped_config_folders_describe_their_family(family):
    folder = config_folder(family)
    index = json.loads((folder / "model_index.json").read_text())
    assert ("text_encoder_2" in index) == (family == "sdxl")
    assert base_family(str(folder)) == family
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def _fake_checkpoint(path, width: int, sdxl=False, metadata=None):
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    tensors = {key: torch.zeros(640, width, dtype=torch.float16)}
    if sdxl:
        tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return path


def test_checkpoint_family_is_read_from_the_header(tmp_path):
    assert checkpoint_family(_fake_checkpoint(tmp_path / "a.safetensors", 768)).family == "sd1"
    sd2 = checkpoint_family(_fake_checkpoint(tmp_path / "b.safetensors", 1024))
    assert sd2.family == "sd2" and sd2.ambiguous
    v = _fake_checkpoint(
        tmp_path / "c.safetensors", 1024, metadata={"modelspec.prediction_type": "v"}
    )
    assert checkpoint_family(v).family == "sd2-v"
    xl = _fake_checkpoint(tmp_path / "d.safetensors", 2048, sdxl=True)
    assert checkpoint_family(xl).family == "sdxl"


def test_bad_bases_are_named(tmp_path, tiny_checkpoint):
    lora_path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, lora_path)
    with pytest.raises(SdloraError, match="is a LoRA, not a base model"):
        load_base(str(lora_path))
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, ckpt)
    with pytest.raises(SdloraError, match="--allow-pickle"):
        load_base(str(ckpt))
    with pytest.raises(SdloraError, match="does not exist"):
        load_base(str(tmp_path / "nope.safetensors"))
    with pytest.raises(SdloraError, match="unknown built-in model 'tiny:sd3'"):
        load_base("tiny:sd3")


def test_random_sd15_architecture_round_trips_through_diffusers(tmp_path):
    """A rank-4 LoRA on the real SD 1.5 UNet and text encoder (random init) is written in
    kohya format, loaded by diffusers' own loader with every key, and gives the same outputs."""
    folder = config_folder("sd1")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    tiny = tiny_components("sd1")
    base = Base(name="sd15-random", family="sd1", unet=unet, text_encoder=text_encoder,
                tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                vae=tiny["vae"], scheduler=tiny["scheduler"])  # fmt: skip
    inject_lora(unet, 4, 2, UNET_ATTENTION)
    inject_lora(text_encoder, 4, 2, TEXT_ENCODER_ATTENTION)
    for model in (unet, text_encoder):
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    lora = Lora({"unet": extract_lora(unet), "text_encoder": extract_lora(text_encoder)})
    path = save_lora(tmp_path / "sd15.safetensors", lora, "sd1", "kohya", {}, "fp32")

    ids = base.tokenizer(["zkstyle, a lighthouse"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids  # fmt: skip
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])

    def outputs():
        with torch.no_grad():
            text = text_encoder(ids)[0]
            return text, unet(latents, t, text).sample

    trained = outputs()
    unet.delete_adapters("default")
    text_encoder.delete_adapter("default")
    assert not lora_layers(unet) and not lora_layers(text_encoder)
    plain = outputs()
    base.pipeline().load_lora_weights(str(path))
    assert len(lora_layers(unet)) == 128 and len(lora_layers(text_encoder)) == 48
    loaded = outputs()
    for a, b, c in zip(trained, loaded, plain, strict=True):
        assert (a - b).abs().max() <= 1e-5
        assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_half_precision_diffusers_folder_loads_in_float32(tmp_path, family):
    # Folders on the hub are often saved in fp16; every module must come back in one dtype.
    parts = tiny_components(family)
    Base(name="tiny", family=family, **parts).pipeline().to(torch.float16).save_pretrained(tmp_path)
    base = load_base(str(tmp_path))
    modules = (base.unet, base.vae, *base.text_encoders.values())
    assert {m.dtype for m in modules} == {torch.float32}
    assert torch.equal(base.unet.conv_in.weight, parts["unet"].conv_in.weight.half().float())
