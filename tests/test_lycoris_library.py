"""sdlora's LoRA/LoCon/LoHa/LoKr/DoRA files read by the LyCORIS library's own kohya loader
(`lycoris.kohya.create_network_from_weights`, what sd-scripts and its GUIs load them with):
every key consumed, its forward pass giving the outputs sdlora's generate gives, and its
merged weights equal to sdlora's."""

import pytest
import torch
from test_algos import _unet_output
from test_loha_lokr import _te_outputs

from sdlora.algos import adapted_weight
from sdlora.export import build_metadata, save_kohya
from sdlora.generate import Generator, LoraSpec
from sdlora.lora import TEXT_ENCODER_ATTENTION, UNET_ATTENTION, Lora, extract_lora, inject_lora
from sdlora.lorafile import read_lora
from sdlora.models import load_base
from sdlora.naming import kohya_name

kohya = pytest.importorskip("lycoris.kohya")

# (inject_lora options, alpha): every algo with convs at conv rank 2 (lokr-split at rank 1,
# so both Kronecker factors are low-rank products on the tiny widths).
CASES = {
    "lora": ({}, 2.0),
    "locon": ({"conv_rank": 2, "conv_alpha": 1.0}, 2.0),
    "dora": ({"conv_rank": 2, "conv_alpha": 1.0, "dora": True}, 2.0),
    "loha": ({"algo": "loha", "conv_rank": 2, "conv_alpha": 1.0}, 2.0),
    "lokr": ({"algo": "lokr", "conv_rank": 2, "conv_alpha": 1.0}, 2.0),
    "lokr-split": (
        {"algo": "lokr", "decompose_both": True, "conv_rank": 1, "conv_alpha": 1.0},
        3.0,
    ),
}


def _write(path, case: str, alpha_is_rank: bool = False):
    """A file of `case` written by sdlora's kohya writer from peft layers on tiny:sd1 whose
    every tensor is random (so no update is zero)."""
    options, alpha = CASES[case]
    rank = 1 if case == "lokr-split" else 4
    if alpha_is_rank:
        alpha = float(rank)
        options = {**options, "conv_alpha": float(options.get("conv_rank", rank))}
    algo = options.get("algo", "locon" if "conv_rank" in options else "lora")
    te_options = {k: v for k, v in options.items() if not k.startswith("conv")}
    base = load_base("tiny:sd1")
    torch.manual_seed(0)
    inject_lora(base.unet, rank, alpha, UNET_ATTENTION, **options)
    inject_lora(base.text_encoder, rank, alpha, TEXT_ENCODER_ATTENTION, **te_options)
    with torch.no_grad():
        for model in (base.unet, base.text_encoder):
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)
    components = {"unet": extract_lora(base.unet), "text_encoder": extract_lora(base.text_encoder)}
    meta = build_metadata(
        family="sd1", title="t", rank=rank, alpha=alpha, trigger_words=[], resolution=64,
        algo=algo, conv_rank=options.get("conv_rank"), conv_alpha=options.get("conv_alpha"),
        dora=options.get("dora", False),
    )  # fmt: skip
    return save_kohya(path, Lora(components, family="sd1"), "sd1", meta, dtype="fp32")


def _lycoris_network(path, base, monkeypatch):
    """LyCORIS's network for `path` on `base`, and the modules it made."""
    # LyCORIS 4.1.x's default preset adapts `time_embedding.linear_1` twice on a diffusers
    # SD 1.x UNet (by name, and inside its TimestepEmbedding target), and its network
    # refuses that ("duplicated lora name: lora_unet_time_embedding_linear_1") before it
    # reads any weight; the preset is narrowed to the names that file holds none of anyway.
    monkeypatch.setattr(
        kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", ["conv_in", "conv_out"]
    )
    # Its text-encoder names carry the `text_model` level of transformers 4's CLIPTextModel
    # (as sd-scripts' files do); transformers 5 dropped it, so the encoder is wrapped in it.
    encoder = torch.nn.Module()
    encoder.text_model = base.text_encoder
    network, weights = kohya.create_network_from_weights(
        1.0, str(path), base.vae, encoder, base.unet, for_inference=True
    )
    return network, encoder, weights, network.unet_loras + network.text_encoder_loras


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_consumes_every_key_and_applies_what_generate_applies(case, tmp_path, monkeypatch):
    path = _write(tmp_path / f"{case}.safetensors", case)
    base = load_base("tiny:sd1")
    network, encoder, weights, modules = _lycoris_network(path, base, monkeypatch)
    consumed = {f"{m.lora_name}.{key}" for m in modules for key in m.state_dict()}
    assert consumed == set(weights)
    lora = read_lora(path)
    assert len(modules) == sum(1 for _ in lora.modules())

    network.apply_to(encoder, base.unet, apply_text_encoder=True, apply_unet=True)
    ours = Generator.load("tiny:sd1", [LoraSpec(path)], device="cpu", dtype="fp32").base
    assert (_unet_output(base) - _unet_output(ours)).abs().max() <= 1e-5
    fresh = load_base("tiny:sd1")
    assert (_unet_output(ours) - _unet_output(fresh)).abs().max() > 1e-4
    for theirs, mine in zip(_te_outputs(base), _te_outputs(ours), strict=True):
        assert (theirs - mine).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_merged_weights_equal_sdloras(case, tmp_path, monkeypatch):
    # alpha = rank: LyCORIS 4.1.3 multiplies LoHa's and LoKr's update by alpha / rank twice
    # when merging (get_diff_weight scales get_weight's already scaled update), though its
    # forward pass and ComfyUI apply it once; at scale 1 both agree. The test above checks
    # the scale through the forward pass.
    path = _write(tmp_path / f"{case}.safetensors", case, alpha_is_rank=True)
    base = load_base("tiny:sd1")
    _, _, _, modules = _lycoris_network(path, base, monkeypatch)
    weights = {}
    for component, model in (("unet", base.unet), ("text_encoder", base.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                weights[kohya_name(component, name, "sd1")] = module.weight.detach().clone()
    lora = read_lora(path)
    expected = {
        kohya_name(c, p, "sd1"): adapted_weight(m, weights[kohya_name(c, p, "sd1")])
        for c, p, m in lora.modules()
    }
    for module in modules:
        module.merge_to(1.0)
        merged = module.org_module[0].weight
        assert (merged - expected[module.lora_name]).abs().max() <= 1e-5, module.lora_name
    assert len(expected) == len(modules)
