"""LoRA files: names and counts on real architectures, readers, writers, hashes, metadata."""

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch
from conftest import random_lora
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlora.errors import SdloraError
from sdlora.export import build_metadata, save_kohya, save_lora, to_kohya_state_dict
from sdlora.families import detect_lora_family
from sdlora.lora import (
    TEXT_ENCODER_ATTENTION,
    UNET_ALL_LINEAR,
    UNET_ATTENTION,
    Lora,
    LoraModule,
    inject_lora,
    lora_layers,
)
from sdlora.lorafile import inspect_lora, lora_from_state_dict, read_lora
from sdlora.models import config_folder
from sdlora.naming import split_kohya_name


def meta_model(family: str, component: str):
    """A real-architecture component of `family` on the meta device (no memory, no init)."""
    folder = config_folder(family) / component
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        config = CLIPTextConfig.from_pretrained(folder)
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return cls(config)


def shaped_lora(model, targets, rank=4) -> dict[str, LoraModule]:
    """LoRA modules with the shapes peft gives `model`'s `targets` (zeros, on the CPU)."""
    inject_lora(model, rank, rank, targets)
    return {
        name: LoraModule(
            torch.zeros(layer.lora_A["default"].weight.shape),
            torch.zeros(layer.lora_B["default"].weight.shape),
            float(rank),
        )
        for name, layer in lora_layers(model).items()
    }


def names(tensors: dict, prefix: str) -> set[str]:
    return {k.split(".")[0] for k in tensors if k.startswith(prefix + "_")}


@pytest.mark.parametrize(
    "targets, expected", [(UNET_ATTENTION, 128), (UNET_ALL_LINEAR, 192)], ids=["attention", "all"]
)
def test_sd15_unet_names_and_counts(targets, expected):
    unet = shaped_lora(meta_model("sd1", "unet"), targets)
    tensors = to_kohya_state_dict(Lora({"unet": unet}), "sd1")
    assert len(names(tensors, "lora_unet")) == expected
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 768)
    assert tensors[f"{key}.lora_up.weight"].shape == (320, 4)
    assert tensors[f"{key}.alpha"].dim() == 0 and tensors[f"{key}.alpha"].dtype == torch.float16
    blocks = {
        n.split("_transformer")[0].removesuffix("_proj_in").removesuffix("_proj_out")
        for n in names(tensors, "lora_unet")
    }
    assert len(blocks) == 16 and "lora_unet_up_blocks_3_attentions_2" in blocks


@pytest.mark.parametrize("family, layers, width", [("sd1", 12, 768), ("sd2", 23, 1024)])
def test_sd_text_encoder_names(family, layers, width):
    te = shaped_lora(meta_model(family, "text_encoder"), TEXT_ENCODER_ATTENTION)
    tensors = to_kohya_state_dict(Lora({"text_encoder": te}), family)
    found = names(tensors, "lora_te")
    assert len(found) == 4 * layers
    last = f"lora_te_text_model_encoder_layers_{layers - 1}_self_attn_q_proj"
    assert last in found and tensors[f"{last}.lora_down.weight"].shape == (4, width)


def test_sdxl_names_counts_and_both_text_encoders():
    lora = Lora(
        {
            "unet": shaped_lora(meta_model("sdxl", "unet"), UNET_ALL_LINEAR),
            "text_encoder": shaped_lora(meta_model("sdxl", "text_encoder"), TEXT_ENCODER_ATTENTION),
            "text_encoder_2": shaped_lora(
                meta_model("sdxl", "text_encoder_2"), TEXT_ENCODER_ATTENTION
            ),
        }
    )
    tensors = to_kohya_state_dict(lora, "sdxl")
    unet = names(tensors, "lora_unet")
    assert len(unet) == 722
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_",
                             "lora_unet_middle_block_1_")) for n in unet)  # fmt: skip
    key = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 2048)
    assert tensors[f"{key}.lora_up.weight"].shape == (640, 4)
    assert len(names(tensors, "lora_te1")) == 48 and len(names(tensors, "lora_te2")) == 128
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in names(tensors, "lora_te2")
    assert not names(tensors, "lora_te")  # SDXL never writes the single-encoder prefix
    # Reading the SAI names back gives the diffusers paths.
    read = lora_from_state_dict(tensors, {})
    assert set(read.components["unet"]) == set(lora.components["unet"])
    assert detect_lora_family(read).family == "sdxl"


def test_kohya_names_map_back_to_paths():
    cases = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": (
            "unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0": (
            "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        "lora_unet_output_blocks_5_1_proj_in": ("unet", "up_blocks.1.attentions.2.proj_in"),
        "lora_unet_input_blocks_4_0_emb_layers_1": ("unet", "down_blocks.1.resnets.0.time_emb_proj"),
        "lora_te_text_model_encoder_layers_3_mlp_fc1": ("text_encoder", "encoder.layers.3.mlp.fc1"),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (
            "text_encoder_2", "encoder.layers.0.self_attn.v_proj"),
    }  # fmt: skip
    for name, expected in cases.items():
        assert split_kohya_name(name) == expected, name


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_and_diffusers_files_round_trip_losslessly(family, tmp_path):
    lora = random_lora(family)
    kohya = save_lora(tmp_path / "k.safetensors", lora, family, "kohya", {}, "fp32")
    diffusers = save_lora(tmp_path / "d.safetensors", lora, family, "diffusers", {}, "fp32")
    for path in (kohya, diffusers):
        back = read_lora(path)
        assert back.family == family
        assert back.components.keys() == lora.components.keys()
        for component, path_, module in lora.modules():
            got = back.components[component][path_]
            assert torch.equal(got.down, module.down) and torch.equal(got.up, module.up)
            assert got.alpha == module.alpha


def test_export_cli_converts_back_to_identical_tensors(tmp_path):
    from sdlora.cli import main

    lora = random_lora("sd1")
    first = save_lora(tmp_path / "a.safetensors", lora, "sd1", "kohya", {}, "fp16")
    assert (
        main(["export", str(first), "--format", "diffusers", "-o", str(tmp_path / "b.safetensors")])
        == 0
    )
    assert main(["export", str(tmp_path / "b.safetensors"), "--format", "kohya",
                 "-o", str(tmp_path / "c.safetensors")]) == 0  # fmt: skip
    a = safetensors.torch.load_file(first)
    c = safetensors.torch.load_file(tmp_path / "c.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert (
        main(["export", str(first), "--format", "kohya", "-o", str(tmp_path / "c.safetensors")])
        == 2
    )


def test_older_diffusers_forms_are_read():
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    state = {
        f"{block}.processor.to_out_lora.down.weight": down,
        f"{block}.processor.to_out_lora.up.weight": up,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": up,
    }  # fmt: skip
    lora = lora_from_state_dict(state, {})
    assert set(lora.components["unet"]) == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    }
    assert set(lora.components["text_encoder"]) == {"encoder.layers.0.self_attn.q_proj"}
    assert all(m.alpha == 4.0 for _, _, m in lora.modules())  # no metadata: scale 1


def test_metadata_values_are_strings_and_header_stays_small(tmp_path):
    tags = {"style": {f"tag {i} " + "x" * 300: i for i in range(20_000)}}
    meta = build_metadata(family="sd2-v", title="t", rank=8, alpha=4, trigger_words=["zk"],
                          resolution=768, tag_frequency=tags, training={"steps": 10})  # fmt: skip
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert json.loads(meta["ss_tag_frequency"])["style"]["zk"] == 1
    lora = random_lora("sd1")
    path = save_kohya(tmp_path / "big.safetensors", lora, "sd1", meta)
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    assert header_len < 1_000_000
    written = json.loads(data[8 : 8 + header_len])["__metadata__"]
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + header_len :]).hexdigest()
    assert written["modelspec.hash_sha256"] == "0x" + written["sshs_model_hash"]
    assert len(written["sshs_legacy_hash"]) == 8


def test_inspect_reports_family_counts_triggers_and_hashes(tmp_path, capsys):
    from sdlora.cli import main

    lora = random_lora("sdxl")
    meta = build_metadata(family="sdxl", title="t", rank=4, alpha=2, trigger_words=["zkfoo"],
                          resolution=1024)  # fmt: skip
    path = save_kohya(tmp_path / "x.safetensors", lora, "sdxl", meta)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["prediction_type"] == "epsilon"
    assert info["ranks"] == [4] and info["alphas"] == [2.0]
    # tiny SDXL: 28 transformer blocks (depths 1, 2, 3) x 8 attention projections
    assert info["modules"] == {"unet": 224, "text_encoder": 8, "text_encoder_2": 12}
    assert info["trigger_words"] == ["zkfoo"] and info["base_label"] == ""
    assert info["hashes"]["autov2"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert info["hashes"]["autov3"] == info["metadata"]["sshs_model_hash"][:12]
    # A third-party diffusers file without metadata: family from structure, hashes computed.
    plain = save_lora(tmp_path / "p.safetensors", lora, "sdxl", "diffusers", {}, "fp16")
    info = inspect_lora(plain)
    assert info["family"] == "sdxl" and info["format"] == "diffusers"
    assert info["hashes"]["autov3"] and info["trigger_words"] == []


def test_the_base_label_is_recorded_beside_the_sd_scripts_values_and_inspect_shows_it(
    tmp_path, capsys
):
    from sdlora.cli import main

    meta = build_metadata(family="sdxl", title="t", rank=4, alpha=2, trigger_words=["zk"],
                          resolution=1024, base_label="pony")  # fmt: skip
    assert meta["ss_base_model_label"] == "Pony"  # Civitai's spelling
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    path = save_kohya(tmp_path / "x.safetensors", random_lora("sdxl"), "sdxl", meta)
    assert main(["inspect", str(path)]) == 0
    assert "base model:  Pony" in capsys.readouterr().out
    # a file whose only word on its base is the label: SDXL, as Pony is
    assert detect_lora_family(Lora({}, metadata={"ss_base_model_label": "Pony"})).family == "sdxl"


def test_trigger_words_fall_back_to_tags_in_every_caption():
    from sdlora.lorafile import trigger_words

    meta = {"ss_tag_frequency": json.dumps({"10_zk": {"zk": 10, "tree": 3}}),
            "ss_dataset_dirs": json.dumps({"10_zk": {"n_repeats": 10, "img_count": 10}})}  # fmt: skip
    assert trigger_words(meta) == ["zk"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"is empty \(0 bytes\)"),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n",
            "git-lfs pointer",
        ),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "truncated"),
        (b"hello", "truncated"),
    ],
    ids=["empty", "lfs", "short-header", "tiny"],
)
def test_broken_files_are_named(tmp_path, content, message):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(SdloraError, match=message) as e:
        read_lora(path)
    assert str(path) in str(e.value)


def test_cut_off_file_is_truncated(tmp_path):
    lora = random_lora("sd1")
    path = save_lora(tmp_path / "x.safetensors", lora, "sd1", "kohya", {}, "fp16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SdloraError, match="truncated"):
        read_lora(path)


def test_lycoris_and_full_checkpoints_are_named(tmp_path):
    loha = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4),
            "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 4)}  # fmt: skip
    safetensors.torch.save_file(loha, tmp_path / "loha.safetensors")
    with pytest.raises(SdloraError, match="LoHa"):
        read_lora(tmp_path / "loha.safetensors")
    lokr = {"lora_unet_mid_block_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4)}
    safetensors.torch.save_file(lokr, tmp_path / "lokr.safetensors")
    with pytest.raises(SdloraError, match="LoKr"):
        read_lora(tmp_path / "lokr.safetensors")
    full = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}
    safetensors.torch.save_file(full, tmp_path / "full.safetensors")
    with pytest.raises(SdloraError, match="full model checkpoint"):
        read_lora(tmp_path / "full.safetensors")


def test_pickle_files_need_permission_and_load_weights_only(tmp_path):
    lora = random_lora("sd1")
    tensors = to_kohya_state_dict(lora, "sd1", "fp32")
    path = tmp_path / "old.ckpt"
    torch.save(tensors, path)
    with pytest.raises(SdloraError, match="--allow-pickle"):
        read_lora(path)
    back = read_lora(path, allow_pickle=True)
    assert back.family == "sd1" and back.count("unet") == lora.count("unet")

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(SdloraError, match="weights_only"):
        read_lora(tmp_path / "evil.ckpt", allow_pickle=True)
