"""Write a diffusers SD 1.x/2.x pipeline's weights in the original single-file (LDM) layout.

Test support only: it lets the suite build a checkpoint the way the original repositories
save them, then load it back through sdlora's single-file path.
"""

from __future__ import annotations

RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
}  # fmt: skip


def unet_to_ldm(state: dict, n_blocks: int, layers: int) -> dict:
    renames = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2",
    }  # fmt: skip
    for i in range(n_blocks):
        for j in range(layers):
            renames[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{3 * i + j + 1}.0"
            renames[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{3 * i + j + 1}.1"
        renames[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{3 * (i + 1)}.0.op"
        for j in range(layers + 1):
            renames[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{3 * i + j}.0"
            renames[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{3 * i + j}.1"
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        renames[f"up_blocks.{i}.upsamplers.0"] = (
            f"output_blocks.{3 * i + 2}.{2 if has_attention else 1}"
        )
    out = {}
    for key, value in state.items():
        new = _rename(key, renames)
        if ".resnets." in key:
            for a, b in RESNET.items():
                new = new.replace(f".{a}.", f".{b}.")
        out["model.diffusion_model." + new] = value
    return out


def _rename(key: str, renames: dict) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if key.startswith(old + "."):
            return renames[old] + key[len(old) :]
    return key


def vae_to_ldm(state: dict, n_blocks: int) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for i in range(n_blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(
                f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."
            )
            up = n_blocks - 1 - i
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace(
            "mid_block.resnets.1.", "mid.block_2."
        )
        new = new.replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in VAE_ATTENTION.items():
                new = new.replace(f".{a}.", f".{b}.")
            if value.dim() == 2:  # the original VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + new] = value
    return out


def sd_to_single_file(components: dict) -> dict:
    """The original single-file state dict of a tiny SD 1.x pipeline's components."""
    unet, vae, te = components["unet"], components["vae"], components["text_encoder"]
    state = {}
    state.update(
        unet_to_ldm(
            unet.state_dict(), len(unet.config.block_out_channels), unet.config.layers_per_block
        )
    )
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    for key, value in te.state_dict().items():
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {k: v.contiguous() for k, v in state.items()}
