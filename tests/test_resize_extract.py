"""`sdlora resize` (SVD down-rank of a LoRA/LoCon file) and `sdlora extract` (a LoRA from the
difference of two checkpoints): the maths against an independent SVD, the files written, and
the refusals."""

import json

import pytest
import torch
from conftest import random_lora
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.export import build_metadata, save_lora
from sdlora.generate import Generator
from sdlora.lora import Lora, LoraModule
from sdlora.lorafile import read_lora
from sdlora.models import load_base
from sdlora.prompts import LoraSpec
from sdlora.resize import resize_lora
from sdlora.stfile import sha256_after_header


def _delta(module: LoraModule) -> torch.Tensor:
    """(α/r)·up·down flattened to [out, in·k·k], written out here rather than taken from algos."""
    r = module.down.shape[0]
    return (
        module.alpha / r * (module.up.reshape(module.up.shape[0], r) @ module.down.reshape(r, -1))
    )


def _module(out: int, inn: int, rank: int, true_rank: int, seed: int, kernel: int = 0):
    """A module of `rank` whose update has rank `true_rank` (so SVD can recover it exactly)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(true_rank, inn * max(kernel, 1) ** 2, generator=g)
    mix = torch.randn(rank, true_rank, generator=g)
    down = (mix @ a).reshape(rank, inn, kernel, kernel) if kernel else mix @ a
    up = torch.randn(out, rank, generator=g) * 0.1
    return LoraModule(down, up.reshape(out, rank, 1, 1) if kernel else up, alpha=4.0)


def test_resize_keeps_the_best_low_rank_update_and_reports_its_frobenius_fraction():
    lora = Lora({"unet": {"a.to_q": _module(24, 16, rank=8, true_rank=8, seed=0),
                          "b.to_k": _module(24, 16, rank=8, true_rank=3, seed=1),
                          "c.conv1": _module(12, 6, rank=8, true_rank=8, seed=2, kernel=3),
                          "d.to_v": _module(24, 16, rank=2, true_rank=2, seed=3)}}, family="sd1")  # fmt: skip
    resized, report = resize_lora(lora, rank=4, conv_rank=2)
    kept = {k.path: k for k in report.modules}
    for path, module in lora.components["unet"].items():
        new = resized.components["unet"][path]
        s = torch.linalg.svdvals(_delta(module))
        r = new.rank
        assert r == {"a.to_q": 4, "b.to_k": 4, "c.conv1": 2, "d.to_v": 2}[path]
        assert new.alpha == pytest.approx(4.0 * r / module.rank)
        # Eckart–Young: the residual of the best rank-r approximation is the dropped σ.
        residual = (_delta(new) - _delta(module)).norm()
        assert residual == pytest.approx(float(s[r:].square().sum().sqrt()), abs=1e-4)
        expected = float((s[:r].square().sum() / s.square().sum()).sqrt())
        assert kept[path].fraction == pytest.approx(expected, abs=1e-5)
        assert new.down.shape[1:] == module.down.shape[1:]
    assert kept["b.to_k"].fraction == pytest.approx(1.0, abs=1e-6)  # rank 3 fits in 4
    assert kept["d.to_v"].fraction == 1.0  # already at rank 2: unchanged
    assert resized.components["unet"]["d.to_v"].down.equal(lora.components["unet"]["d.to_v"].down)
    total = sum(k.norm**2 for k in report.modules)
    assert report.overall == pytest.approx(
        (sum((k.fraction * k.norm) ** 2 for k in report.modules) / total) ** 0.5
    )
    assert 0 < report.overall < 1


def test_dynamic_rank_keeps_what_the_fraction_asks_for():
    lora = Lora({"unet": {"a.to_q": _module(32, 32, rank=16, true_rank=16, seed=4)}}, family="sd1")
    resized, report = resize_lora(lora, rank=16, dynamic="sv_fro", param=0.9)
    (kept,) = report.modules
    assert kept.fraction >= 0.9 and kept.rank < 16
    smaller, fewer = resize_lora(lora, rank=kept.rank - 1)
    assert smaller.components["unet"]["a.to_q"].rank == kept.rank - 1
    assert fewer.modules[0].fraction < 0.9


def _write(path, lora, family="sd1", algo="lora", conv_rank=None):
    meta = build_metadata(family=family, title="demo", rank=8, alpha=4.0, trigger_words=["zk"],
                          resolution=512, algo=algo, conv_rank=conv_rank,
                          conv_alpha=None if conv_rank is None else 4.0)  # fmt: skip
    save_lora(path, lora, family, "kohya", meta, "fp32")


def test_resize_cli_writes_a_smaller_file_with_sd_scripts_metadata(tmp_path, capsys):
    lora = random_lora("sd1", rank=8, alpha=4.0)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _write(src, lora)
    assert main(["resize", str(src), "--rank", "2", "-o", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "Frobenius" in printed and str(out) in printed
    resized = read_lora(out)
    assert {m.rank for _, _, m in resized.modules()} == {2}
    assert {m.alpha for _, _, m in resized.modules()} == {1.0}
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"
    assert meta["modelspec.trigger_phrase"] == "zk"
    assert meta["sshs_model_hash"] == sha256_after_header(out.read_bytes())
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert resized.family == "sd1" and out.stat().st_size < src.stat().st_size


def test_resize_at_the_files_rank_changes_nothing_generate_sees(tmp_path):
    lora = random_lora("sd1", rank=4, alpha=2.0)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _write(src, lora)
    assert main(["resize", str(src), "--rank", "4", "-o", str(out), "--dtype", "fp32"]) == 0
    a, b = read_lora(src), read_lora(out)
    for (_, path, m), (_, _, n) in zip(a.modules(), b.modules(), strict=True):
        assert (_delta(m) - _delta(n)).abs().max() <= 1e-5, path


def test_resize_locon_keeps_conv_dim_in_network_args(tmp_path):
    lora = random_lora("sd1", rank=4, alpha=2.0)
    lora.components["unet"]["down_blocks.0.resnets.0.conv1"] = _module(32, 32, 4, 4, 5, kernel=3)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _write(src, lora, algo="locon", conv_rank=4)
    assert main(["resize", str(src), "--rank", "2", "--conv-rank", "1", "-o", str(out)]) == 0
    resized = read_lora(out)
    assert resized.components["unet"]["down_blocks.0.resnets.0.conv1"].down.shape == (1, 32, 3, 3)
    with safe_open(str(out), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args["algo"] == "locon" and args["conv_dim"] == "1" and args["conv_alpha"] == "1.0"


def test_resize_refuses_larger_ranks_other_algos_and_existing_files(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _write(src, random_lora("sd1", rank=4, alpha=2.0))
    assert main(["resize", str(src), "--rank", "8", "-o", str(out)]) == 2
    assert "larger than the rank" in capsys.readouterr().err and not out.exists()
    loha = tmp_path / "loha.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.hada_w1_a": torch.ones(4, 2), f"{name}.hada_w1_b": torch.ones(2, 4),
               f"{name}.hada_w2_a": torch.ones(4, 2), f"{name}.hada_w2_b": torch.ones(2, 4),
               f"{name}.alpha": torch.tensor(2.0)}, str(loha))  # fmt: skip
    assert main(["resize", str(loha), "--rank", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "LoHa" in err and "LoRA and LoCon files only" in err and not out.exists()
    out.write_bytes(b"mine")
    assert main(["resize", str(src), "--rank", "2", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["resize", str(src), "--rank", "2", "-o", str(src), "--overwrite"]) == 2
    assert main(["resize", str(src), "--rank", "2", "--dynamic", "sv_fro", "-o", "x"]) == 2
    assert "--dynamic-param" in capsys.readouterr().err
    assert main(["resize", str(src), "--rank", "2", "--dynamic", "fro", "-o", "x"]) == 2
    assert "unknown --dynamic method 'fro'" in capsys.readouterr().err


# ---- extract ----


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet.eval()(latents, torch.tensor([400]), text).sample.float()


def _te_output(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(torch.tensor([[1, 5, 9, 2, 7]])).last_hidden_state.float()


def _fine_tune(base, seed=0, rank=2, conv=False):
    """Perturb `base` in place as a fine-tune would: a low-rank change to every attention
    projection of the UNet and the text encoder (and the ResNet convs with `conv`), plus
    a little full-rank noise on the UNet's."""
    g = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in base.unet.named_modules() if n.endswith(("to_q", "to_v"))]
    targets += [(n, m) for n, m in base.text_encoder.named_modules() if n.endswith("q_proj")]
    if conv:
        targets += [(n, m) for n, m in base.unet.named_modules() if n.endswith("resnets.0.conv1")]
    with torch.no_grad():
        for name, module in targets:
            w = module.weight
            flat = w.reshape(w.shape[0], -1)
            a = torch.randn(flat.shape[0], rank, generator=g)
            b = torch.randn(rank, flat.shape[1], generator=g)
            change = 0.3 * flat.norm() / (a @ b).norm() * (a @ b)
            w += change.reshape(w.shape)
            if "text_model" not in name and w.dim() == 2:
                w += 1e-3 * flat.norm() / flat.numel() ** 0.5 * torch.randn(w.shape, generator=g)
    return len(targets)


def test_extract_recovers_a_fine_tune_that_generate_then_applies(tmp_path, capsys):
    tuned = load_base("tiny:sd1")
    _fine_tune(tuned)
    folder = tmp_path / "tuned"
    tuned.pipeline().save_pretrained(folder)
    out = tmp_path / "extracted.safetensors"
    argv = ["extract", "--base", "tiny:sd1", "--tuned", str(folder), "--rank", "4", "-o", str(out)]
    assert main([*argv, "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "left out" in printed

    lora = read_lora(out)
    assert lora.family == "sd1" and {m.rank for _, _, m in lora.modules()} == {4}
    layers = [n for n, _ in tuned.text_encoder.named_modules() if n.endswith("q_proj")]
    assert lora.count("text_encoder") == len(layers)  # the rest did not change
    assert all(p.endswith(("to_q", "to_v")) for p in lora.components["unet"])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"

    base = load_base("tiny:sd1")
    applied = Generator.load("tiny:sd1", [LoraSpec(out)], device="cpu", dtype="fp32").base
    target_unet, target_te = _unet_output(tuned.unet), _te_output(tuned.text_encoder)
    before = (_unet_output(base.unet) - target_unet).norm()
    after = (_unet_output(applied.unet) - target_unet).norm()
    assert after < 0.05 * before
    te_before = (_te_output(base.text_encoder) - target_te).norm()
    assert (_te_output(applied.text_encoder) - target_te).norm() < 0.01 * te_before


def test_extract_with_conv_rank_writes_locon_convs(tmp_path):
    from sdlora.extract import extract_lora

    tuned = load_base("tiny:sd1")
    _fine_tune(tuned, conv=True)
    lora, report = extract_lora(load_base("tiny:sd1"), tuned, rank=4, conv_rank=2)
    convs = {p: m for p, m in lora.components["unet"].items() if p.endswith("conv1")}
    assert convs and all(
        m.down.shape[0] == 2 and m.down.shape[2:] == (3, 3) for m in convs.values()
    )
    assert min(k.fraction for k in report.modules if k.path in convs) == pytest.approx(
        1.0, abs=1e-4
    )


def test_extract_refuses_two_families_and_identical_models(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["extract", "--base", "tiny:sd1", "--tuned", "tiny:sdxl", "--rank", "4",
                 "-o", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "SD 1.x" in err and "SDXL" in err and "one family" in err and not out.exists()
    assert main(["extract", "--base", "tiny:sd1", "--tuned", "tiny:sd1", "--rank", "4",
                 "-o", str(out)]) == 2  # fmt: skip
    assert "no difference" in capsys.readouterr().err and not out.exists()
