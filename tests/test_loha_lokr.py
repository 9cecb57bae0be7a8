"""LoHa and LoKr: trained through peft, written in the LyCORIS kohya layout, read back into a
fresh base exactly, and applied as a hand-written reference of each algo says; files written
by other trainers (Tucker factors, another LoKr factor) read and applied the same way."""

import json

import pytest
import safetensors.torch
import torch
from conftest import tiny_overrides
from safetensors import safe_open
from test_algos import _unet_output

from sdlora import load_config, train
from sdlora.errors import SdloraError
from sdlora.export import save_lora
from sdlora.generate import Generator, LoraSpec
from sdlora.guard import check_compatible
from sdlora.lorafile import inspect_lora, read_lora
from sdlora.models import load_base
from sdlora.naming import kohya_name

ALGOS = {
    "loha": ["lora.algo=loha", "lora.conv_rank=2", "lora.conv_alpha=1"],
    # rank 4 on the tiny widths: both Kronecker factors whole (the scale baked in)
    "lokr": ["lora.algo=lokr"],
    # rank 1: each factor a low-rank product, scaled by alpha / rank in the loaders
    "lokr-split": ["lora.algo=lokr", "lora.rank=1", "lora.lokr_decompose_both=true"],
}


def _te_outputs(base) -> list[torch.Tensor]:
    """Every text encoder's last hidden state on fixed tokens."""
    ids = torch.arange(2, 12)[None]
    out = []
    for encoder in base.text_encoders.values():
        encoder.eval()
        with torch.no_grad():
            out.append(encoder(ids).last_hidden_state.float())
    return out


def _train(algo, family, style_dir, tmp_path, steps=2):
    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=steps) + ALGOS[algo]
    overrides += [f"model.base=tiny:{family}", "output.dtype=fp32"]
    return train(load_config(None, overrides), progress=False)


@pytest.mark.parametrize(
    "algo,family",
    [("loha", "sd1"), ("loha", "sdxl"), ("lokr", "sd1"), ("lokr", "sdxl"), ("lokr-split", "sd1")],
)
def test_trained_file_reads_back_into_a_fresh_base_exactly(algo, family, style_dir, tmp_path):
    result = _train(algo, family, style_dir, tmp_path)
    trained_unet, trained_te = _unet_output(result.base), _te_outputs(result.base)
    loaded = Generator.load(
        f"tiny:{family}", [LoraSpec(result.lora_path)], device="cpu", dtype="fp32"
    )
    fresh = load_base(f"tiny:{family}")
    assert (_unet_output(loaded.base) - trained_unet).abs().max() <= 1e-5
    assert (trained_unet - _unet_output(fresh)).abs().max() > 1e-4
    for ours, trained, base in zip(
        _te_outputs(loaded.base), trained_te, _te_outputs(fresh), strict=True
    ):
        assert (ours - trained).abs().max() <= 1e-5
        assert (trained - base).abs().max() > 1e-5

    with safe_open(str(result.lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    kind = algo.split("-")[0]
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == kind
    info = inspect_lora(result.lora_path)
    assert info["family"] == family and info["algo"] == kind
    assert info["modules"]["text_encoder"] > 0
    conv = "input_blocks_1_0_in_layers_2" if family == "sdxl" else "down_blocks_0_resnets_0_conv1"
    suffixes = {k.split(".", 1)[1] for k in keys if k.startswith(f"lora_unet_{conv}.")}
    expected = {
        "loha": {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        "lokr": {"alpha", "lokr_w1", "lokr_w2"},
        "lokr-split": {"alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    }[algo]
    assert suffixes == expected
    if kind == "lokr":
        assert args["factor"] == "-1" and args["decompose_both"] == str(algo == "lokr-split")
    else:
        assert args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The Kronecker product written out: block (i, j) is w1[i, j] · w2 (w2 may be a conv's
    [b, d, k, k], or flat [b, d·k·k])."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:])
    for i in range(a):
        for j in range(c):
            out[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


def _tucker(core, out_mode, in_mode):
    """A conv weight from a Tucker core [r, r, k, k] and modes [r, out], [r, in], by loops."""
    r1, r2, kh, kw = core.shape
    out = torch.zeros(out_mode.shape[1], in_mode.shape[1], kh, kw)
    for i in range(r1):
        for j in range(r2):
            out += core[i, j] * torch.outer(out_mode[i], in_mode[j])[:, :, None, None]
    return out


def _reference_delta(t: dict, alpha: float, shape) -> torch.Tensor:
    """Each algo's update written by hand from the LyCORIS definitions:
    LoHa (w1a·w1b)⊙(w2a·w2b)·α/r; LoKr w1 ⊗ w2, ·α/r when a factor is a product."""
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2 * alpha / t["hada_w1_b"].shape[0]).reshape(shape)
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), None)
    scale = 1.0 if rank is None else alpha / rank
    return (_kron(w1, w2) * scale).reshape(shape)


def _check_fused_against_reference(path, family="sd1") -> int:
    """Fuse the file with generate and compare every module with `_reference_delta`; returns
    how many conv modules were checked."""
    lora = read_lora(path)
    fused = Generator.load(f"tiny:{family}", [LoraSpec(path)], fuse=True, device="cpu")
    base = load_base(f"tiny:{family}")
    checked = 0
    for component, module_path, module in lora.modules():
        model = {"unet": base.unet, **base.text_encoders}[component]
        other = {"unet": fused.base.unet, **fused.base.text_encoders}[component]
        weights = dict(model.named_parameters())
        fused_weights = {k.replace(".base_layer", ""): v for k, v in other.named_parameters()}
        name = next(
            n for n in (module_path, "text_model." + module_path) if n + ".weight" in weights
        )
        weight = weights[name + ".weight"].float()
        expected = weight + _reference_delta(module.tensors(), module.alpha, weight.shape)
        assert (fused_weights[name + ".weight"].float() - expected).abs().max() <= 1e-5, name
        checked += weight.dim() == 4
    return checked


@pytest.mark.parametrize("algo", ["loha", "lokr", "lokr-split"])
def test_generate_applies_the_reference_delta_of_each_algo(algo, style_dir, tmp_path):
    result = _train(algo, "sd1", style_dir, tmp_path, steps=1)
    assert _check_fused_against_reference(result.lora_path) > 0


def _foreign_file(path, algo: str, family="sd1"):
    """A file as another trainer writes it: LoHa with Tucker cores on a 3x3 conv, or LoKr with
    factor 4 and a Tucker w2, random values, on tiny `family`."""
    base = load_base(f"tiny:{family}")
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    conv = "down_blocks.0.resnets.0.conv1"  # [32, 32, 3, 3] in tiny:sd1
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # [32, 32]
    out, inp = base.unet.get_submodule(conv).weight.shape[:2]
    modules = {}
    if algo == "loha":
        modules[conv] = {
            "hada_t1": rand(2, 2, 3, 3), "hada_w1_a": rand(2, out), "hada_w1_b": rand(2, inp),
            "hada_t2": rand(2, 2, 3, 3), "hada_w2_a": rand(2, out), "hada_w2_b": rand(2, inp),
            "alpha": torch.tensor(1.0),
        }  # fmt: skip
        modules[linear] = {
            "hada_w1_a": rand(32, 2), "hada_w1_b": rand(2, 32), "hada_w2_a": rand(32, 2),
            "hada_w2_b": rand(2, 32), "alpha": torch.tensor(4.0),
        }  # fmt: skip
    else:  # factor 4: 32 = 4 x 8
        modules[conv] = {
            "lokr_w1": rand(4, 4), "lokr_t2": rand(2, 2, 3, 3), "lokr_w2_a": rand(2, out // 4),
            "lokr_w2_b": rand(2, inp // 4), "alpha": torch.tensor(1.0),
        }  # fmt: skip
        modules[linear] = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 8), "alpha": torch.tensor(9.0)}
    tensors = {
        f"{kohya_name('unet', p, family)}.{role}": t
        for p, roles in modules.items()
        for role, t in roles.items()
    }
    safetensors.torch.save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya"})
    return path


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_files_of_other_trainers_with_tucker_factors_read_and_apply(algo, tmp_path):
    path = _foreign_file(tmp_path / f"{algo}.safetensors", algo)
    info = inspect_lora(path)
    assert info["family"] == "sd1" and info["algo"] == algo
    assert _check_fused_against_reference(path) == 1


def test_refused_what_cannot_be_applied(style_dir, tmp_path):
    path = _foreign_file(tmp_path / "loha.safetensors", "loha")
    tensors = safetensors.torch.load_file(path)
    name = kohya_name("unet", "down_blocks.0.resnets.0.conv1", "sd1")
    broken = {**tensors, f"{name}.hada_w2_b": torch.zeros(3, 32)}
    safetensors.torch.save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(SdloraError, match="do not fit together"):
        read_lora(tmp_path / "broken.safetensors")
    with_dora = {**tensors, f"{name}.dora_scale": torch.ones(32, 1, 1, 1)}
    safetensors.torch.save_file(with_dora, tmp_path / "dora.safetensors")
    with pytest.raises(SdloraError, match="LoHa with DoRA"):
        read_lora(tmp_path / "dora.safetensors")
    other = kohya_name("unet", "down_blocks.0.attentions.0.proj_in", "sd1")
    mixed = {**tensors, f"{other}.lora_down.weight": torch.zeros(2, 32)}
    mixed[f"{other}.lora_up.weight"] = torch.zeros(32, 2)
    safetensors.torch.save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(SdloraError, match="mixes LoHa and LoRA modules"):
        read_lora(tmp_path / "mixed.safetensors")
    with pytest.raises(SdloraError, match="kohya/LyCORIS layout only"):
        save_lora(tmp_path / "d.safetensors", read_lora(path), "sd1", "diffusers")
    # Tensors that fit each other but not the base's conv [32, 32, 3, 3]: the guard says so.
    narrow = {
        **tensors,
        f"{name}.hada_w1_b": torch.zeros(2, 16),
        f"{name}.hada_w2_b": torch.zeros(2, 16),
    }
    safetensors.torch.save_file(narrow, tmp_path / "narrow.safetensors")
    with pytest.raises(SdloraError, match=r"differ in shape.*conv1 \(LoRA \[32, 16, 3, 3\]"):
        check_compatible(load_base("tiny:sd1"), read_lora(tmp_path / "narrow.safetensors"))


def test_config_refuses_what_loha_and_lokr_cannot_do(style_dir, tmp_path):
    base = tiny_overrides(style_dir, tmp_path / "run")
    with pytest.raises(SdloraError, match='lora.dora applies to lora.algo = "lora" or "locon"'):
        load_config(None, base + ["lora.algo=loha", "lora.dora=true"])
    with pytest.raises(SdloraError, match='lora.lokr_factor applies to lora.algo = "lokr"'):
        load_config(None, base + ["lora.algo=loha", "lora.lokr_factor=4"])
    with pytest.raises(SdloraError, match="lora.lokr_decompose_both applies"):
        load_config(None, base + ["lora.lokr_decompose_both=true"])
    with pytest.raises(SdloraError, match="lora.lokr_factor must be -1 or a positive"):
        load_config(None, base + ["lora.algo=lokr", "lora.lokr_factor=0"])
    config = load_config(None, base + ["lora.algo=lokr"])
    assert (config.lora.lokr_factor, config.lora.lokr_decompose_both) == (-1, False)
    assert (config.lora.conv_rank, config.lora.conv_alpha) == (4, 4.0)


def test_init_from_a_loha_file_continues_from_it(style_dir, tmp_path):
    first = _train("loha", "sd1", style_dir, tmp_path / "a", steps=1)
    again = tiny_overrides(style_dir, tmp_path / "b", steps=1) + ALGOS["loha"]
    again += ["lora.alpha=8", "lora.conv_alpha=2"]  # other scales: the update stays the file's
    config = load_config(None, again + [f"lora.init_from={first.lora_path}", "train.lr=1e-12"])
    second = train(config, progress=False)
    assert (_unet_output(second.base) - _unet_output(first.base)).abs().max() <= 1e-5
    with pytest.raises(SdloraError, match="is a LoHa file; set lora.algo to match"):
        plain = tiny_overrides(style_dir, tmp_path / "c", steps=1) + ALGOS["lokr"]
        train(load_config(None, plain + [f"lora.init_from={first.lora_path}"]), progress=False)


def test_merge_writes_the_reference_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    from sdlora.merge import merge

    path = _foreign_file(tmp_path / "lokr.safetensors", "lokr")
    merge("tiny:sd1", [LoraSpec(path)], tmp_path / "merged", dtype="fp32")
    merged = dict(
        UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").named_parameters()
    )
    base = dict(load_base("tiny:sd1").unet.named_parameters())
    for module_path, module in read_lora(path).components["unet"].items():
        weight = base[module_path + ".weight"].detach()
        expected = weight + _reference_delta(module.tensors(), module.alpha, weight.shape)
        assert (merged[module_path + ".weight"] - expected).abs().max() <= 1e-5
        assert (merged[module_path + ".weight"] - weight).abs().max() > 1e-3
