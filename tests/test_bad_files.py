"""Bad LoRA files are refused in one line; no file sdlora writes is ever broken or partial."""

import errno
import json
import os
import re
import struct

import pytest
import torch
from conftest import random_lora, tiny_overrides
from safetensors.torch import save_file

from sdlora import load_config, train
from sdlora.checkpoint import (
    MARKER,
    complete_checkpoints,
    find_checkpoint,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
)
from sdlora.cli import main
from sdlora.errors import SdloraError, printable
from sdlora.export import save_kohya, save_lora, to_diffusers_state_dict
from sdlora.lora import Lora, LoraModule
from sdlora.lorafile import read_lora

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"


@pytest.fixture(scope="module")
def lora():
    return random_lora("sd1", std=0.3)


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("sdlora: error: "), err
    return err


def _raw(path, header: object, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ([1, 2, 3], b"", "header that is a JSON list"),
        ({"__metadata__": {"a": 1}, "x": F32}, bytes(16), "metadata that is not text"),
        ({"x": {"dtype": "F32", "shape": [2, 2]}}, bytes(16), "no valid data_offsets"),
        ({"x": {**F32, "shape": [3, 3]}}, bytes(16), "shape [3, 3] (F32: 36 bytes)"),
        ({"x": {**F32, "dtype": "Q7"}}, bytes(16), "unknown dtype 'Q7'"),
        ({"x": "tensor"}, b"", "has no description"),
        ({"x": {**F32, "shape": [-1, 2]}}, bytes(16), "no valid shape"),
        ({"x": F32}, bytes(8), "truncated"),
        ({"x": F32, "y": F32}, bytes(16), "not a readable safetensors file"),  # overlapping
    ],
    ids=["list", "metadata", "offsets", "shape", "dtype", "entry", "negative", "short", "overlap"],
)
def test_malformed_headers_are_one_line_errors_naming_the_file(
    tmp_path, capsys, header, data, message
):
    path = tmp_path / "bad.safetensors"
    _raw(path, header, data)
    with pytest.raises(SdloraError, match=re.escape(message)) as e:
        read_lora(path)
    assert str(path) in str(e.value)
    for command in (["inspect", str(path)], ["export", str(path), "--format", "kohya", "-o",
                                             str(tmp_path / "out.safetensors")]):  # fmt: skip
        assert message in _one_line_error(capsys, main(command))
    assert not (tmp_path / "out.safetensors").exists()


def test_random_bytes_are_not_safetensors(tmp_path, capsys):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    _one_line_error(capsys, main(["inspect", str(path)]))


def _module_file(tmp_path, down, up, alpha) -> str:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    path = tmp_path / "m.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": alpha}, path)  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    "down, up, alpha, message",
    [
        ((4, 32), (32, 8), (), "disagree on the rank (down [4, 32], up [32, 8])"),
        ((4, 32), (32, 4), (2,), "alpha has shape [2]"),
        ((4,), (32, 4), (), "no LoRA's shape"),
        ((4, 32, 3, 3), (32, 4, 3, 3), (), "must be 1x1"),
        ((0, 32), (32, 0), (), "no LoRA's shape"),
    ],
    ids=["rank", "alpha", "vector", "conv-up", "empty"],
)
def test_modules_of_inconsistent_shapes_are_refused_naming_the_module(
    tmp_path, capsys, down, up, alpha, message
):
    path = _module_file(tmp_path, torch.ones(down), torch.ones(up), torch.ones(alpha))
    for command in ("inspect", "generate"):
        args = [command, path] if command == "inspect" else [
            "generate", "--base", "tiny:sd1", "--lora", path, "--prompt", "x", "--out",
            str(tmp_path / "o")]  # fmt: skip
        err = _one_line_error(capsys, main(args))
        assert f"module unet:{Q}" in err and message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["up", "alpha"])
def test_non_finite_loras_are_refused_for_use_and_reported_by_inspect(
    lora, tmp_path, capsys, where
):
    bad = Lora({c: dict(m) for c, m in lora.components.items()}, family="sd1")
    first = sorted(bad.components["text_encoder"])[0]  # the first module in file order
    module = bad.components["text_encoder"][first]
    if where == "up":
        up = module.up.clone()
        up[0, 0] = float("nan")
        bad.components["text_encoder"][first] = LoraModule(module.down, up, module.alpha)
    else:
        bad.components["text_encoder"][first] = LoraModule(module.down, module.up, float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file(_kohya_tensors(bad), path)
    out = tmp_path / "out.safetensors"
    named = f"first in module text_encoder:{first}"
    for args in (
        ["export", str(path), "--format", "diffusers", "-o", str(out)],
        ["generate", "--base", "tiny:sd1", "--lora", str(path), "--prompt", "x", "--out",
         str(tmp_path / "o")],
        ["merge", "--base", "tiny:sd1", "--lora", str(path), "-o", str(tmp_path / "merged")],
    ):  # fmt: skip
        assert named in _one_line_error(capsys, main(args))
    assert not out.exists() and not (tmp_path / "o").exists()
    assert not (tmp_path / "merged").exists()

    assert main(["inspect", str(path)]) == 0
    assert f"NOT FINITE:  1 module(s) hold NaN or infinity (first: text_encoder:{first})" in (
        capsys.readouterr().out
    )
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)  # strict JSON: no bare NaN
    assert info["non_finite_modules"] == [f"text_encoder:{first}"]


def _kohya_tensors(lora: Lora) -> dict:
    """What a writer without sdlora's checks would put in a file (NaN and all)."""
    from sdlora.naming import kohya_name

    tensors = {}
    for component, path, m in lora.modules():
        name = kohya_name(component, path, "sd1")
        tensors[f"{name}.lora_down.weight"] = m.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = m.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha)
    return tensors


def test_a_non_finite_lora_is_refused_as_init_from_and_a_checkpoint_on_resume(
    lora, style_dir, tmp_path
):
    bad = Lora({c: dict(m) for c, m in lora.components.items()}, family="sd1")
    first = sorted(bad.components["unet"])[0]
    module = bad.components["unet"][first]
    bad.components["unet"][first] = LoraModule(module.down * float("inf"), module.up, 2.0)
    save_file(_kohya_tensors(bad), tmp_path / "inf.safetensors")
    overrides = tiny_overrides(style_dir, tmp_path / "run", 1)
    with pytest.raises(SdloraError, match=f"first in module unet:{first}"):
        train(load_config(None, overrides + [f"lora.init_from={tmp_path / 'inf.safetensors'}"]))

    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    save_file({"unet.x": torch.tensor([1.0, float("nan")])}, checkpoint / "lora.safetensors")
    torch.save({"step": 1}, checkpoint / "state.pt")
    (checkpoint / MARKER).write_text("1\n")
    with pytest.raises(SdloraError, match="holds NaN or infinity \\(first in unet.x\\)"):
        load_checkpoint(checkpoint)


def test_values_beyond_fp16_are_refused_after_the_cast_and_nothing_is_written(lora, tmp_path):
    big = Lora({c: dict(m) for c, m in lora.components.items()}, family="sd1")
    first = sorted(big.components["unet"])[-1]
    module = big.components["unet"][first]
    big.components["unet"][first] = LoraModule(module.down, module.up * 1e6, 4.0)  # fp32: finite
    path = tmp_path / "big.safetensors"
    for write in (
        lambda: save_kohya(path, big, "sd1", {}, dtype="fp16"),
        lambda: save_lora(path, big, "sd1", "diffusers", {}, dtype="fp16"),
    ):
        with pytest.raises(SdloraError, match=f"module unet:{first} does not fit in fp16"):
            write()
        assert list(tmp_path.iterdir()) == []
    save_kohya(path, big, "sd1", {}, dtype="fp32")  # fits in fp32 and bf16
    assert to_diffusers_state_dict(big, "bf16")[0]


def test_training_whose_weights_overflow_fp16_writes_no_lora(style_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(style_dir, out, 1) + [
        "train.lr=1e30", "train.save_every=1", "output.step_loras=true", "sample.report_images=0",
        "sample.prompts=[]"]  # fmt: skip
    with pytest.raises(SdloraError, match="does not fit in fp16 .*; nothing was written"):
        train(load_config(None, overrides), progress=False)
    assert not list(out.glob("*.safetensors"))


def test_checkpoints_refuse_non_finite_weights(tmp_path):
    params = {"unet.a": torch.tensor([1.0, float("inf")])}
    with pytest.raises(SdloraError, match="unet.a is not finite at step 3; nothing was written"):
        save_checkpoint(tmp_path, 3, params, {}, keep_last=2)
    assert list(tmp_path.iterdir()) == []


def _disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_and_leaves_no_file(lora, tmp_path, capsys, monkeypatch):
    source = save_lora(tmp_path / "in.safetensors", lora, "sd1", "kohya", {}, "fp32")
    out = tmp_path / "out" / "x.safetensors"
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(SdloraError, match=r"x.safetensors could not be written: the disk is full"):
        save_lora(out, lora, "sd1")
    err = _one_line_error(
        capsys, main(["export", str(source), "--format", "kohya", "-o", str(out)])
    )
    assert "the disk is full (it needs 0." in err and "MB free); free some space" in err
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    params = {"unet.a": torch.ones(64, 64)}
    save_checkpoint(tmp_path, 1, params, {"x": 1}, keep_last=1)
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(SdloraError, match="could not be written: the disk is full"):
        save_checkpoint(tmp_path, 2, {"unet.a": torch.zeros(64, 64)}, {"x": 2}, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    tensors, state = load_checkpoint(complete_checkpoints(tmp_path)[0])
    assert torch.equal(tensors["unet.a"], params["unet.a"]) and state["step"] == 1


def test_a_long_file_name_is_written_through_a_short_temporary_name(lora, tmp_path):
    path = tmp_path / ("s" * 238 + ".safetensors")  # 250 characters: a file system's limit is 255
    save_lora(path, lora, "sd1", "kohya", {}, "fp16")
    assert read_lora(path).count("unet") == lora.count("unet")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_half_written_checkpoint_folders_are_removed(tmp_path):
    save_checkpoint(tmp_path, 1, {"unet.a": torch.ones(2)}, {}, keep_last=2)
    root = tmp_path / "checkpoints"
    for name in (".step_000002.k3j9x", ".step_000003.a1b2c"):  # a kill -9 mid-write leaves these
        (root / name).mkdir()
        (root / name / "lora.safetensors").write_bytes(b"partial")
    removed = remove_incomplete(tmp_path)
    assert [p.name for p in removed] == [".step_000002.k3j9x", ".step_000003.a1b2c"]
    assert [p.name for p in root.iterdir()] == ["step_000001"]
    assert remove_incomplete(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("name", ["lora.safetensors", "state.pt"])
@pytest.mark.parametrize(
    "damage",
    [lambda d: d[: len(d) // 2], lambda d: b"", lambda d: b"not a checkpoint" * 64],
    ids=["cut short", "empty", "garbage"],
)
def test_a_damaged_checkpoint_file_is_named_with_what_to_do_and_kept(tmp_path, name, damage):
    state = {"optimizer": {"w": torch.arange(4096.0)}}
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"unet.a": torch.ones(64, 64)}, state, keep_last=2)
    earlier, damaged = complete_checkpoints(tmp_path)
    file = damaged / name
    file.write_bytes(damage(file.read_bytes()))
    before = file.read_bytes()
    instead = f"; resume from an earlier checkpoint with train.resume={earlier}"
    # find_checkpoint looks before any model loads; load_checkpoint reads the files in full.
    for look in (lambda: find_checkpoint(tmp_path, "latest"), lambda: load_checkpoint(damaged)):
        with pytest.raises(SdloraError) as caught:
            look()
        message = str(caught.value)
        assert message.startswith(f"checkpoint file {file} cannot be read (") and instead in message
        assert "\n" not in message and len(message) < 400 and file.read_bytes() == before

    first = earlier / name  # the run's first checkpoint: nothing earlier to resume from
    first.write_bytes(damage(first.read_bytes()))
    for look in (lambda: find_checkpoint(tmp_path, str(earlier)), lambda: load_checkpoint(earlier)):
        with pytest.raises(SdloraError, match="no earlier checkpoint of the run is complete: st"):
            look()


def test_odd_characters_in_names_are_escaped_in_messages(tmp_path, capsys):
    path = tmp_path / "evil\nname\x1b[31m\u202e.safetensors"
    path.write_bytes(b"")
    err = _one_line_error(capsys, main(["inspect", str(path)]))
    assert "evil\\nname\\x1b[31m\\u202e.safetensors is empty" in err
    assert printable("ünïcode ok") == "ünïcode ok"


def test_a_caption_that_cannot_be_written_is_still_skipped(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "one.png")
    (folder / "one.txt").mkdir()  # where the caption would go: the write fails for real
    (folder / "one.txt" / "x").write_text("")
    assert main(["caption", str(folder), "--trigger", "zk", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "cannot write one.txt" in out and "0 caption(s) written" in out


def test_a_path_the_system_refuses_is_one_line_wherever_it_is_opened(tmp_path, capsys):
    long = str(tmp_path / ("x" * 300))
    for args in (
        [
            "generate",
            "--base",
            long + ".safetensors",
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o"),
        ],
        ["check", long],
        ["inspect", long + ".safetensors"],
    ):
        assert "x" * 300 in _one_line_error(capsys, main(args))
