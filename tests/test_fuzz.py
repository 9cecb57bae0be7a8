"""Fuzzing: whatever file or argument value it is given, sdlora ends with exit 0 or 2, an error
is one line, nothing is left behind on an error, and there is never a traceback.

Seeded and bounded (about 150 cases, run in-process): malformed safetensors headers, random
byte flips and cuts of a valid LoRA, random bytes, random argument values, broken datasets.
"""

import json
import random
import shutil
import struct

import pytest
from conftest import EXAMPLES, random_lora

from sdlora.cli import main
from sdlora.export import build_metadata, save_lora

SEED = 13


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A small valid kohya LoRA (bytes) and a folder holding it for prompt tags."""
    root = tmp_path_factory.mktemp("fuzz")
    lora = random_lora("sd1", rank=2, alpha=2, std=0.2)
    meta = build_metadata(family="sd1", title="good", rank=2, alpha=2, trigger_words=["zk"],
                          resolution=64)  # fmt: skip
    path = save_lora(root / "good.safetensors", lora, "sd1", "kohya", meta, "fp16")
    return path.read_bytes(), root


def run(argv, capsys, written=None):
    """Run the command; check the exit code, stderr, and that an error wrote nothing."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code in (0, 2), f"{argv}: exit {code}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert len(err.splitlines()) <= 1, f"{argv}: more than one line on stderr:\n{err}"
    if code == 2 and written is not None:
        assert not written.exists(), f"{argv} failed but wrote {written}"
    return code, out, err


# --- malformed files ---------------------------------------------------------------------


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "neg", "float", "str", "none", "bool", "list", "dict"][: 8 if depth < 3 else 6]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, 2, 4, 16, 2**31, 2**64])
    if kind == "neg":
        return -rng.randint(1, 100)
    if kind == "float":
        return rng.choice([0.5, 1e308, -0.0])
    if kind == "str":
        return rng.choice(["F32", "F16", "BF16", "Q9", "", "x" * 50, "\n\x00"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["dtype", "shape", "data_offsets", "__metadata__", "lora_unet_x.alpha", "a"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _mutated_header(rng: random.Random, data: bytes) -> bytes:
    """The valid file with one header entry changed (a key dropped or given a random value)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = rng.choice(sorted(header))
    entry = header[name]
    if name == "__metadata__":
        header[name] = rng.choice([[1, 2], {"ss_tag_frequency": 3}, "text", None,
                                   {"ss_tag_frequency": "[1, {\"a\": \"b\"}]"},
                                   {"lora_adapter_metadata": "{\"unet.lora_alpha\": \"x\"}"}])  # fmt: skip
    else:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.3:
            entry.pop(key)
        else:
            entry[key] = _random_json(rng)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _malformed(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["header", "entry", "flip", "flip", "cut", "noise"])
    if kind == "header":
        text = json.dumps(_random_json(rng)).encode()
        return struct.pack("<Q", len(text)) + text + bytes(rng.randint(0, 64))
    if kind == "entry":
        return _mutated_header(rng, data)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if kind == "cut":
        return data[: rng.randrange(len(data))]
    return rng.randbytes(rng.choice([3, 8, 9, 100, 5000]))


@pytest.mark.parametrize("case", range(60))
def test_inspect_and_export_of_malformed_files(valid, tmp_path, capsys, case):
    rng = random.Random(SEED * 1000 + case)
    data, _ = valid
    path = tmp_path / rng.choice(["bad.safetensors", "bad.safetensors", "bad.ckpt"])
    path.write_bytes(_malformed(rng, data))
    pickle = ["--allow-pickle"] if path.suffix == ".ckpt" and rng.random() < 0.5 else []
    run(["inspect", path, *pickle], capsys)
    code, out, _ = run(["inspect", "--json", path, *pickle], capsys)
    if code == 0:
        json.loads(out)  # strict JSON whatever the file holds
    target = tmp_path / "out.safetensors"
    fmt, dtype = rng.choice(["kohya", "diffusers"]), rng.choice(["fp16", "bf16", "fp32"])
    code, _, _ = run(["export", path, "--format", fmt, "--dtype", dtype, "--family", "sd1",
                      "-o", target, *pickle], capsys, written=target)  # fmt: skip
    if code == 0:  # what export writes reads back
        assert run(["inspect", target], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {path.name} | ({target.name} if code == 0 else set())
    )


@pytest.mark.parametrize("case", range(6))
def test_generate_with_malformed_files(valid, tmp_path, capsys, case):
    rng = random.Random(SEED * 2000 + case)
    data, _ = valid
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_malformed(rng, data))
    out = tmp_path / "out"
    run(["generate", "--base", "tiny:sd1", "--lora", path, "--prompt", "zk, a circle",
         "--steps", 1, "--size", "64x64", "--out", out], capsys, written=out)  # fmt: skip


# --- random argument values ----------------------------------------------------------------

ODD = ["0", "-1", "-3", "nan", "inf", "-inf", "1e309", "99999999999999999999", "", "abc", "1.5",
       "\n", "1e3", "18446744073709551616", "0x0", "8x8", "65536x65536", "64x64x64", "-8x64"]  # fmt: skip
OPTIONS = {
    "--steps": ["1", "2"],
    "--seed": ["0", "7", str(2**64 - 1)],
    "--num": ["1"],
    "--cfg": ["0", "7.5", "-2"],
    "--size": ["64x64", "8x8", "64x128"],
    "--max-pixels": ["4096", "100000"],
    "--sampler": ["euler", "ddim", "heun9"],
    "--grid": ["scales=0,1", "trigger=on,off", "scales=", "seeds=1"],
    "--dtype": ["bf16", "fp16", "fp32", "int8"],
    "--device": ["cpu", "cuda", "tpu"],
}
TAGS = ["<lora:good:{}>", "<lora:../good:1>", "<lora:/etc/passwd:1>", "<lora:{}:1>", "<lora:good>",
        "<lora::1>", "<lora:good:0.5:0.5>"]  # fmt: skip


@pytest.mark.parametrize("case", range(50))
def test_generate_with_random_argument_values(valid, tmp_path, capsys, case):
    rng = random.Random(SEED * 3000 + case)
    _, root = valid
    args = {"--steps": "1", "--size": "64x64"}
    for option in rng.sample(sorted(OPTIONS), rng.randint(1, 3)):
        args[option] = rng.choice(OPTIONS[option] + ODD)
    if "--size" in args and args.get("--size") not in OPTIONS["--size"]:
        args["--steps"] = "1"
    prompt = "zk, a circle " + rng.choice(TAGS).format(rng.choice(ODD + ["0.7"]))
    lora = root / "good.safetensors"
    scale = rng.choice(["", ":" + rng.choice(ODD + ["0.5"])])
    out = tmp_path / "out"
    argv = ["generate", "--base", "tiny:sd1", "--prompt", prompt, "--lora-dir", root,
            "--lora", f"{lora}{scale}", "--out", out]  # fmt: skip
    argv += [f"{k}={v}" for k, v in args.items()]
    run(argv, capsys, written=out)


# --- broken datasets -----------------------------------------------------------------------


@pytest.mark.parametrize("case", range(20))
def test_check_of_broken_datasets(tmp_path, capsys, case):
    rng = random.Random(SEED * 4000 + case)
    folder = tmp_path / "data"
    folder.mkdir()
    images = sorted(EXAMPLES.glob("*.png"))
    for i in range(rng.randint(0, 4)):
        source = rng.choice(images)
        data = bytearray(source.read_bytes())
        kind = rng.choice(["good", "flip", "cut", "noise", "caption"])
        if kind == "flip":
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "cut":
            data = data[: rng.randrange(len(data))]
        elif kind == "noise":
            data = bytearray(rng.randbytes(rng.randint(0, 2000)))
        name = rng.choice([f"img{i}.png", f"img{i}.jpg", f"img{i}.webp", f"odd\n{i}.png"])
        (folder / name).write_bytes(bytes(data))
        caption = rng.choice([b"zk, a shape", rng.randbytes(30), b"\xff\xfe\x00z", b""])
        (folder / name).with_suffix(".txt").write_bytes(caption)
    if rng.random() < 0.2:
        shutil.copy(images[0], folder / "plain.png")
    resolution = rng.choice(["512", "64", "0", "-64", "33", "1e3", "99999999999", "nan"])
    argv = ["check", folder, "--resolution", resolution, "--trigger", rng.choice(["zk", "", "\n"])]
    run(argv + (["--json"] if rng.random() < 0.5 else []), capsys)
