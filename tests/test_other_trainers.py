"""Files other trainers write, read with the right weight update: SimpleTuner's LyCORIS files
(`lycoris_` + the UNet's diffusers path) and the DoRA files diffusers writes for a peft-DoRA
model (`lora_magnitude_vector`)."""

import json

import pytest
import torch
from conftest import random_lora, unet_output
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from sdlora.algos import adapted_weight
from sdlora.cli import main
from sdlora.export import save_lora
from sdlora.generate import Generator
from sdlora.lora import LoraModule, lora_layers, resolve_path
from sdlora.lorafile import read_lora
from sdlora.models import load_base
from sdlora.prompts import LoraSpec

SUFFIXES = {"down": ".lora_down.weight", "up": ".lora_up.weight"}


def _te_output(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(torch.tensor([[1, 5, 9, 2, 7]])).last_hidden_state


def _simpletuner_file(path, modules: dict[str, LoraModule]) -> None:
    """What LyCORIS's `save_weights` writes for SimpleTuner: `lycoris_` + the module's
    diffusers path with dots as underscores, kohya's tensor names, its config as metadata."""
    tensors = {}
    for module_path, m in modules.items():
        name = "lycoris_" + module_path.replace(".", "_")
        tensors[name + SUFFIXES["down"]] = m.down.contiguous()
        tensors[name + SUFFIXES["up"]] = m.up.contiguous()
        tensors[name + ".alpha"] = torch.tensor(m.alpha)
    config = {"algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2}
    save_file(tensors, str(path), metadata={"lycoris_config": json.dumps(config)})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_simpletuner_lycoris_file_applies_as_the_same_kohya_file(family, tmp_path, capsys):
    lora = random_lora(family, rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(1)
    conv = "down_blocks.0.resnets.0.conv1"
    weight = load_base(f"tiny:{family}").unet.get_submodule(conv).weight
    lora.components["unet"][conv] = LoraModule(
        torch.randn(2, weight.shape[1], 3, 3, generator=g) * 0.1,
        torch.randn(weight.shape[0], 2, 1, 1, generator=g) * 0.1,
        1.0,
    )
    unet_only = {"unet": lora.components["unet"]}
    lycoris = tmp_path / "pytorch_lora_weights.safetensors"
    _simpletuner_file(lycoris, unet_only["unet"])

    read = read_lora(lycoris)
    assert read.family == family and set(read.components) == {"unet"}
    assert set(read.components["unet"]) == set(lora.components["unet"])
    for path, m in lora.components["unet"].items():
        got = read.components["unet"][path]
        assert got.down.equal(m.down) and got.up.equal(m.up) and got.alpha == m.alpha, path

    assert main(["inspect", str(lycoris), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family and info["algo"] == "locon" and not info["dora"]

    kohya = tmp_path / "kohya.safetensors"
    save_lora(kohya, type(lora)(unet_only, family=family), family, "kohya", {}, "fp32")
    outputs = [
        unet_output(Generator.load(f"tiny:{family}", [LoraSpec(f)], device="cpu").base.unet)
        for f in (lycoris, kohya)
    ]
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-6
    assert (outputs[0] - unet_output(load_base(f"tiny:{family}").unet)).abs().max() > 1e-3


def test_a_file_from_the_lycoris_library_itself_applies_as_lycoris_applies_it(tmp_path, capsys):
    lycoris = pytest.importorskip("lycoris")
    base = load_base("tiny:sd1")
    torch.manual_seed(0)
    network = lycoris.create_lycoris(base.unet, 1.0, linear_dim=4, linear_alpha=2, algo="lora")
    network.apply_to()
    for name, param in network.named_parameters():
        if "lora_up" in name:
            torch.nn.init.normal_(param, std=0.05)
    expected = unet_output(base.unet)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps({"algo": "lora"})})

    lora = read_lora(path)
    assert lora.count("unet") == len(network.loras)  # every module of the file read
    applied = Generator.load("tiny:sd1", [LoraSpec(path)], device="cpu", dtype="fp32").base
    assert (unet_output(applied.unet) - expected).abs().max() <= 1e-4
    assert (expected - unet_output(load_base("tiny:sd1").unet)).abs().max() > 1e-2
    capsys.readouterr()  # LyCORIS logs to stdout
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sd1"


def test_diffusers_dora_file_applies_peft_dora_weights(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    tuned = load_base("tiny:sd1")
    configs = {
        "unet": LoraConfig(
            r=4, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"], use_dora=True
        ),
        "text_encoder": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True),
    }
    models = {"unet": tuned.unet, "text_encoder": tuned.text_encoder}
    g = torch.Generator().manual_seed(0)
    for component, model in models.items():
        model.add_adapter(configs[component])
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].weight.normal_(0, 0.1, generator=g)
                magnitude = layer.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.2 * torch.rand(magnitude.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(tuned.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(tuned.text_encoder),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora = read_lora(path)
    assert lora.family == "sd1" and all(m.dora for _, _, m in lora.modules())
    assert {m.alpha for m in lora.components["unet"].values()} == {2.0}
    assert {m.alpha for m in lora.components["text_encoder"].values()} == {4.0}
    assert any(p.endswith("conv1") for p in lora.components["unet"])

    fresh = load_base("tiny:sd1")
    originals = {c: dict(getattr(fresh, c).named_parameters()) for c in models}
    for component, model in models.items():
        layers = lora_layers(model)
        for path_, module in lora.components[component].items():
            name = resolve_path(set(layers), path_)
            layer, weight = layers[name], originals[component][name + ".weight"]
            with torch.no_grad():
                merged = layer.get_base_layer().weight.detach().clone()
                layer.merge(adapter_names=["default"])
                merged, unmerged = layer.get_base_layer().weight.detach().clone(), merged
                layer.unmerge()
            assert unmerged.equal(weight)
            assert (adapted_weight(module, weight) - merged).abs().max() <= 1e-5, path_

    applied = Generator.load("tiny:sd1", [LoraSpec(path)], device="cpu", dtype="fp32").base
    assert (unet_output(applied.unet) - unet_output(tuned.unet)).abs().max() <= 1e-5
    assert (_te_output(applied.text_encoder) - _te_output(tuned.text_encoder)).abs().max() <= 1e-5
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["algo"] == "locon" and info["dora"]


def test_inspect_names_a_plain_lora_as_lora(tmp_path, capsys):
    path = tmp_path / "plain.safetensors"
    save_lora(path, random_lora("sd1"), "sd1", "kohya", {}, "fp32")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["algo"] == "lora" and info["dora"] is False
    assert main(["inspect", str(path)]) == 0
    assert "algo:        lora\n" in capsys.readouterr().out
