"""The walking skeleton end to end: training, the exported file, the base left untouched."""

import json

import pytest
import torch
from safetensors import safe_open

from sdlora.lora import UNET_ATTENTION, extract_lora, inject_lora, lora_layers, lora_parameters
from sdlora.models import load_base
from sdlora.step import diffusion_loss, encode_text


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Non-LoRA weights by their original module path (peft's `base_layer.` level removed)."""
    return {
        name.replace(".base_layer", ""): p.detach()
        for name, p in model.named_parameters()
        if "lora_" not in name
    }


def test_a_step_changes_only_lora_parameters():
    base = load_base("tiny:sd1")
    before = {k: v.clone() for k, v in _base_weights(base.unet).items()}
    inject_lora(base.unet, rank=4, alpha=4, targets=UNET_ATTENTION)
    lora_before = {k: v.clone() for k, v in base.unet.named_parameters() if v.requires_grad}
    optimizer = torch.optim.AdamW(lora_parameters(base.unet), lr=1e-2)
    latents = torch.randn(2, 4, 8, 8)
    text, _ = encode_text(base, ["zk, a circle", "zk, a square"], "cpu")
    loss = diffusion_loss(
        base.unet,
        base.scheduler,
        latents,
        text.detach(),
        torch.randn_like(latents),
        torch.tensor([10, 500]),
    )
    loss.backward()
    optimizer.step()
    after = _base_weights(base.unet)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [
        k
        for k, v in base.unet.named_parameters()
        if v.requires_grad and not torch.equal(v, lora_before[k])
    ]
    assert len(changed) == len(lora_before) > 0


def test_merged_weight_is_base_plus_scaled_product():
    base = load_base("tiny:sd1")
    inject_lora(base.unet, rank=4, alpha=2, targets=UNET_ATTENTION)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = lora_layers(base.unet)[path]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.in_features)
    module = extract_lora(base.unet)[path]
    expected = x @ (layer.base_layer.weight + module.delta()).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert module.alpha == 2.0 and module.rank == 4


def test_base_weights_are_bit_identical_after_training(trained):
    fresh = load_base("tiny:sd1")
    for component in ("unet", "text_encoder", "vae"):
        ref = _base_weights(getattr(fresh, component))
        got = _base_weights(getattr(trained.base, component))
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), component


def test_lora_was_trained(trained):
    lora = extract_lora(trained.base.unet)
    assert any(m.up.abs().sum() > 0 for m in lora.values())
    lines = [json.loads(line) for line in (trained.run_dir / "log.jsonl").open()]
    losses = [line["loss"] for line in lines if "loss" in line]  # the others: validation
    assert losses == trained.losses and len(losses) == 3


def test_kohya_file_has_sd1_names_shapes_and_metadata(trained):
    with safe_open(str(trained.lora_path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        down = f.get_tensor(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
        )
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha")
    unet = {k for k in keys if k.startswith("lora_unet_")}
    te = {k for k in keys if k.startswith("lora_te_text_model_encoder_layers_")}
    assert len(unet) == 3 * 128 and len(te) == 3 * 2 * 4 and keys == unet | te
    assert down.shape == (4, 32)
    assert alpha.dim() == 0 and alpha.item() == 2.0 and alpha.is_floating_point()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "zkstripes"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"])["style"]["zkstripes"] == 6
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


def test_diffusers_loads_every_key_and_reproduces_outputs(trained):
    with safe_open(str(trained.lora_path), "pt") as f:
        n_file = {
            p: len({k.split(".")[0] for k in f.keys() if k.startswith(p + "_")})
            for p in ("lora_unet", "lora_te")
        }
    fresh = load_base("tiny:sd1")
    fresh.pipeline().load_lora_weights(str(trained.lora_path))
    assert len(lora_layers(fresh.unet)) == n_file["lora_unet"] == 128
    assert len(lora_layers(fresh.text_encoder)) == n_file["lora_te"] == 8

    ids = fresh.tokenizer(
        ["zkstripes, a circle"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents, t = (
        torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([400]),
    )
    with torch.no_grad():
        outs = []
        for model in (trained.base, fresh, load_base("tiny:sd1")):
            model.unet.eval()
            model.text_encoder.eval()
            text = model.text_encoder(ids)[0]
            outs.append((text, model.unet(latents, t, text).sample))
    assert (outs[0][0] - outs[1][0]).abs().max() <= 1e-5
    assert (outs[0][1] - outs[1][1]).abs().max() <= 1e-5
    assert (outs[0][1] - outs[2][1]).abs().max() > 1e-4  # the LoRA does change the output


@pytest.mark.parametrize("family", ["sd2", "sd2-v", "sdxl"])
def test_every_family_trains_and_writes_its_own_file(family, style_dir, tmp_path):
    from conftest import tiny_overrides

    from sdlora import load_config, train
    from sdlora.lorafile import inspect_lora

    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=1)
    result = train(load_config(None, overrides + [f"model.base=tiny:{family}"]), progress=False)
    info = inspect_lora(result.lora_path)
    assert info["family"] == family
    assert info["prediction_type"] == ("v" if family == "sd2-v" else "epsilon")
    with safe_open(str(result.lora_path), "pt") as f:
        keys = list(f.keys())
    if family == "sdxl":
        assert info["modules"]["text_encoder_2"] > 0
        assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in keys)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    else:
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)
        assert any(k.startswith("lora_te_text_model_encoder_layers_2_") for k in keys)


def test_unet_only_lora_with_the_learning_report(style_dir, tmp_path):
    from conftest import tiny_overrides

    from sdlora import load_config, train

    overrides = tiny_overrides(style_dir, tmp_path / "run", steps=1) + ["lora.text_encoder=false"]
    result = train(load_config(None, overrides), progress=False)
    assert result.learning is not None and (tmp_path / "run" / "learning_report.json").is_file()
    with safe_open(str(result.lora_path), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lora_te")]


def test_clip_skip_conditions_on_an_earlier_layer_as_a1111_does():
    base = load_base("tiny:sd1")
    captions = ["zk, a circle"]
    with torch.no_grad():
        last, _ = encode_text(base, captions, "cpu")
        same, _ = encode_text(base, captions, "cpu", clip_skip=1)
        skipped, _ = encode_text(base, captions, "cpu", clip_skip=2)
        ids = base.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
        hidden = base.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states
        expected = base.text_encoder.final_layer_norm(hidden[-2])
    assert torch.equal(last, same)
    assert torch.allclose(skipped, expected) and not torch.allclose(skipped, last)


def test_clip_skip_is_recorded_and_refused_where_it_cannot_apply(style_dir, tmp_path):
    from conftest import tiny_overrides

    from sdlora import load_config, train
    from sdlora.errors import SdloraError

    quiet = ["sample.report_images=0", "train.clip_skip=2"]
    result = train(
        load_config(None, tiny_overrides(style_dir, tmp_path / "a", 1) + quiet), progress=False
    )
    with safe_open(result.lora_path, "pt") as f:
        assert f.metadata()["ss_clip_skip"] == "2"
    xl = tiny_overrides(style_dir, tmp_path / "b", 1) + [
        "model.base=tiny:sdxl",
        "train.clip_skip=3",
    ]
    with pytest.raises(SdloraError, match="SDXL always conditions on the penultimate"):
        train(load_config(None, xl), progress=False)
