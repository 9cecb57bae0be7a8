"""LoCon and DoRA (LoHa and LoKr: test_loha_lokr.py): trained through peft, written in the kohya/LyCORIS layout, read back into a
fresh base exactly, and applied as a hand-written reference of each algo says."""

import json

import pytest
import torch
from conftest import tiny_overrides, unet_output
from safetensors import safe_open

from sdlora import load_config, train
from sdlora.algos import adapted_weight
from sdlora.errors import SdloraError
from sdlora.generate import Generator
from sdlora.lora import lora_layers
from sdlora.lorafile import inspect_lora, read_lora
from sdlora.models import load_base
from sdlora.prompts import LoraSpec

ALGOS = {
    "locon": ["lora.algo=locon", "lora.conv_rank=2", "lora.conv_alpha=1"],
    "dora": ["lora.dora=true"],
    "locon+dora": ["lora.algo=locon", "lora.dora=true"],
}


def _unet_output(base) -> torch.Tensor:
    return unet_output(base.unet)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_trained_file_reads_back_into_a_fresh_base_exactly(algo, family, style_dir, tmp_path):
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + ALGOS[algo]
    overrides += [f"model.base=tiny:{family}", "output.dtype=fp32"]
    result = train(load_config(None, overrides), progress=False)
    trained = _unet_output(result.base)
    loaded = Generator.load(
        f"tiny:{family}", [LoraSpec(result.lora_path)], device="cpu", dtype="fp32"
    )
    fresh = _unet_output(load_base(f"tiny:{family}"))
    assert (_unet_output(loaded.base) - trained).abs().max() <= 1e-5
    assert (trained - fresh).abs().max() > 1e-4

    with safe_open(str(result.lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    info = inspect_lora(result.lora_path)
    assert info["family"] == family
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    if "locon" in algo:
        conv = (
            "input_blocks_1_0_in_layers_2" if family == "sdxl" else "down_blocks_0_resnets_0_conv1"
        )
        down = [k for k in keys if k.startswith(f"lora_unet_{conv}.lora_down")]
        assert down and args["algo"] == "locon"
        with safe_open(str(result.lora_path), "pt") as f:
            assert f.get_tensor(down[0]).shape[2:] == (3, 3)
        if algo == "locon":
            assert args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"
    else:
        assert not any("resnets" in k or "in_layers" in k for k in keys)
    if algo == "locon":  # diffusers' kohya loader takes every module, convs included
        other = load_base(f"tiny:{family}")
        other.pipeline().load_lora_weights(str(result.lora_path))
        unet_modules = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
        assert len(lora_layers(other.unet)) == len(unet_modules)
        assert (_unet_output(other) - trained).abs().max() <= 1e-5
    assert ("dora_wd" in args) == ("dora" in algo)
    assert any(k.endswith(".dora_scale") for k in keys) == ("dora" in algo)


def _reference_weight(weight, down, up, alpha, scale=None):
    """Each algo's weight written out by hand: W + (α/r)·up·down, and for DoRA
    m · V / ‖V‖ with V that sum and the norm per output channel."""
    rank = down.shape[0]
    delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(weight.shape)
    merged = weight + alpha / rank * delta
    if scale is None:
        return merged
    norms = torch.stack([row.norm() for row in merged])
    return merged * (scale.flatten() / norms).reshape(-1, *[1] * (weight.dim() - 1))


@pytest.mark.parametrize("dora", [False, True])
def test_generate_applies_the_reference_delta_of_each_algo(dora, style_dir, tmp_path):
    extra = ["lora.dora=true"] if dora else []
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=2) + ALGOS["locon"] + extra
    result = train(load_config(None, overrides + ["output.dtype=fp32"]), progress=False)
    lora = read_lora(result.lora_path)
    fused = Generator.load("tiny:sd1", [LoraSpec(result.lora_path)], fuse=True, device="cpu")
    weights = dict(load_base("tiny:sd1").unet.named_parameters())
    fused_weights = {k.replace(".base_layer", ""): v for k, v in fused.base.unet.named_parameters()}
    checked = 0
    for path, module in lora.components["unet"].items():
        weight = weights[path + ".weight"].float()
        scale = module.extra.get("dora_scale")
        expected = _reference_weight(weight, module.down, module.up, module.alpha, scale)
        assert (fused_weights[path + ".weight"].float() - expected).abs().max() <= 1e-5, path
        assert (adapted_weight(module, weight) - expected).abs().max() <= 1e-5, path
        checked += weight.dim() == 4
    assert checked > 0 and (module.dora == dora)


def test_config_refuses_what_the_algo_cannot_do(style_dir, tmp_path):
    base = tiny_overrides(style_dir, tmp_path / "run")
    with pytest.raises(SdloraError, match="lora.conv_rank.*lora.algo"):
        load_config(None, base + ["lora.conv_rank=4"])
    with pytest.raises(SdloraError, match="lora.algo must be one of lora, locon, loha, lokr"):
        load_config(None, base + ["lora.algo=ia3"])
    config = load_config(None, base + ["lora.algo=locon"])
    assert (config.lora.conv_rank, config.lora.conv_alpha) == (4, 4.0)


def test_default_lora_file_stays_plain(trained):
    with safe_open(str(trained.lora_path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta
    assert not any(k.endswith(".dora_scale") or "resnets" in k for k in keys)
    assert all(
        layer.lora_magnitude_vector == {} or not len(layer.lora_magnitude_vector)
        for layer in lora_layers(trained.base.unet).values()
    )


@pytest.mark.parametrize(
    "suffix,kind",
    [
        (".oft_blocks", "OFT"),
        (".diff", "full-weight difference"),
        (".on_input", "IA3"),
        (".a1.weight", "GLoRA"),
    ],
)
def test_files_of_algos_sdlora_cannot_apply_are_refused_by_name(suffix, kind, tmp_path):
    import safetensors.torch

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({name + suffix: torch.zeros(4, 4)}, path)
    with pytest.raises(SdloraError, match=kind):
        read_lora(path)


def test_input_axis_dora_and_partial_dora_are_refused(tmp_path):
    import safetensors.torch

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    module = {
        f"{name}.lora_down.weight": torch.randn(2, 32),
        f"{name}.lora_up.weight": torch.randn(16, 2),
        f"{name}.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "dora.safetensors"
    safetensors.torch.save_file({**module, f"{name}.dora_scale": torch.ones(1, 32)}, path)
    with pytest.raises(SdloraError, match="output axis only"):
        read_lora(path)
    other = {k.replace("attn1_to_q", "attn1_to_k"): v.clone() for k, v in module.items()}
    safetensors.torch.save_file({**module, **other, f"{name}.dora_scale": torch.ones(16, 1)}, path)
    with pytest.raises(SdloraError, match="some modules only"):
        read_lora(path)


def test_dora_locon_converts_to_diffusers_and_back_unchanged(style_dir, tmp_path):
    from sdlora.export import save_lora

    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=1) + ALGOS["locon+dora"]
    result = train(load_config(None, overrides + ["output.dtype=fp32"]), progress=False)
    lora = read_lora(result.lora_path)
    path = save_lora(tmp_path / "d.safetensors", lora, "sd1", "diffusers", dtype="fp32")
    back = read_lora(path)
    assert back.file_format == "diffusers" and back.family == "sd1"
    for component, module_path, module in lora.modules():
        other = back.components[component][module_path]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up)
        assert torch.equal(other.extra["dora_scale"], module.extra["dora_scale"])
        assert other.alpha == module.alpha


def test_init_from_a_locon_dora_file_continues_from_it(style_dir, tmp_path):
    overrides = tiny_overrides(style_dir, tmp_path / "a", steps=1) + ALGOS["locon+dora"]
    first = train(load_config(None, overrides + ["output.dtype=fp32"]), progress=False)
    again = tiny_overrides(style_dir, tmp_path / "b", steps=1) + ALGOS["locon+dora"]
    config = load_config(None, again + [f"lora.init_from={first.lora_path}", "train.lr=1e-12"])
    second = train(config, progress=False)
    assert (_unet_output(second.base) - _unet_output(first.base)).abs().max() <= 1e-5
    with pytest.raises(SdloraError, match="set lora.dora to match"):
        plain = tiny_overrides(style_dir, tmp_path / "c", steps=1) + ["lora.algo=locon"]
        train(load_config(None, plain + [f"lora.init_from={first.lora_path}"]), progress=False)
