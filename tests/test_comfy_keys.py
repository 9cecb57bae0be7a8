"""sdlora's files against ComfyUI's LoRA key rules, restated from its source (`comfy/lora.py`:
`model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`; `comfy/weight_adapter/`): a key
whose module ComfyUI does not map, or whose tensor name no adapter of it reads, is logged as
"lora key not loaded" and dropped. Every key of every algo's file must be read."""

import re

import pytest
import torch

from sdlora.export import build_metadata, save_kohya
from sdlora.ldm import unet_to_ldm
from sdlora.lora import TEXT_ENCODER_ATTENTION, UNET_ATTENTION, Lora, extract_lora, inject_lora
from sdlora.models import load_base

# The CLIP layers ComfyUI maps, by transformers path -> kohya spelling.
CLIP_LAYERS = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
# The tensors each of ComfyUI's adapters reads beside a module name (plus `.alpha` and
# `.dora_scale`, read for every adapter), and those each needs together.
READ = {
    "lora": ({".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"},
             [{".lora_up.weight", ".lora_down.weight"}]),
    "loha": ({".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"},
             [{".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"}]),
    "lokr": ({".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b",
              ".lokr_t2"}, []),
}  # fmt: skip
ALGOS = {
    "lora": {},
    "locon": {"conv_rank": 2, "conv_alpha": 1.0},
    "dora": {"conv_rank": 2, "conv_alpha": 1.0, "dora": True},
    "loha": {"algo": "loha", "conv_rank": 2, "conv_alpha": 1.0},
    "lokr": {"algo": "lokr", "conv_rank": 2, "conv_alpha": 1.0},
}
ENCODERS = {"sd1": {"text_encoder": ("lora_te", "lora_te1")},
            "sdxl": {"text_encoder": ("lora_te", "lora_te1"), "text_encoder_2": ("lora_te2",)}}  # fmt: skip


def comfy_module_names(base, family: str) -> set[str]:
    """The kohya module names ComfyUI maps onto `base`: the UNet by its LDM/SGM names and by its
    diffusers names (ComfyUI's `unet_to_diffusers`), each text encoder layer by its prefixes."""
    unet = base.unet
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config.layers_per_block, len(unet.config.block_out_channels))
    names = {
        "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        for key in (*(k.removeprefix("model.diffusion_model.") for k in ldm), *state)
        if key.endswith(".weight")
    }
    for component, prefixes in ENCODERS[family].items():
        layers = getattr(base, component).config.num_hidden_layers
        for b in range(layers):
            for kohya in CLIP_LAYERS.values():
                names |= {f"{p}_text_model_encoder_layers_{b}_{kohya}" for p in prefixes}
    return names


def write(path, family: str, algo: str):
    """A file of `algo` on tiny `family` from peft layers whose every tensor is random."""
    options = ALGOS[algo]
    base = load_base(f"tiny:{family}")
    torch.manual_seed(0)
    inject_lora(base.unet, 4, 2.0, UNET_ATTENTION, **options)
    encoders = list(ENCODERS[family])
    te_options = {k: v for k, v in options.items() if not k.startswith("conv")}
    for name in encoders:
        inject_lora(getattr(base, name), 4, 2.0, TEXT_ENCODER_ATTENTION, **te_options)
    with torch.no_grad():
        for model in (base.unet, *(getattr(base, n) for n in encoders)):
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)
    components = {"unet": extract_lora(base.unet)}
    components |= {name: extract_lora(getattr(base, name)) for name in encoders}
    meta = build_metadata(
        family=family, title="t", rank=4, alpha=2.0, trigger_words=[], resolution=64,
        algo=options.get("algo", "locon" if "conv_rank" in options else "lora"),
        conv_rank=options.get("conv_rank"), conv_alpha=options.get("conv_alpha"),
        dora=options.get("dora", False),
    )  # fmt: skip
    return save_kohya(path, Lora(components, family=family), family, meta, dtype="fp32")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_comfyui_reads_every_key(family, algo, tmp_path):
    from safetensors.torch import load_file

    keys = set(load_file(write(tmp_path / "f.safetensors", family, algo)))
    mapped = comfy_module_names(load_base(f"tiny:{family}"), family)
    ending = re.compile(r"(\.alpha|\.dora_scale|\.lora_\w+\.weight|\.hada_\w+|\.lokr_\w+)$")
    modules: dict[str, set[str]] = {}
    for key in keys:
        match = ending.search(key)
        assert match, f"{key}: no tensor name ComfyUI reads"
        modules.setdefault(key[: match.start()], set()).add(match.group(1))
    assert not set(modules) - mapped, sorted(set(modules) - mapped)[:5]
    kind = {"loha": "loha", "lokr": "lokr"}.get(algo, "lora")
    readable, together = READ[kind]
    for module, tensors in modules.items():
        assert tensors - {".alpha", ".dora_scale"} <= readable, (module, tensors)
        assert ".alpha" in tensors, module
        assert all(group <= tensors for group in together), (module, tensors)
        if kind == "lokr":  # each Kronecker factor whole or as a product
            for w in (".lokr_w1", ".lokr_w2"):
                assert w in tensors or {w + "_a", w + "_b"} <= tensors, (module, tensors)
    assert (algo == "dora") == any(".dora_scale" in t for t in modules.values())
    convs = [
        m
        for m in modules
        if re.search(r"(conv\d?|conv_shortcut|op|skip_connection|in_layers_2|out_layers_3)$", m)
    ]
    assert bool(convs) == (algo != "lora"), convs[:3]
