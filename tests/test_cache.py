"""Latent and text caches, and batches drawn one bucket at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save

from sdlora.buckets import batches_per_epoch, bucket_batches
from sdlora.cache import LatentCache, TextCache, text_fingerprint, vae_fingerprint
from sdlora.dataset import scan_folder
from sdlora.models import load_base


def _folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    ramp = Image.linear_gradient("L").rotate(90)  # dark on the right: a flip changes it
    Image.merge("RGB", [ramp] * 3).resize((128, 64)).save(folder / "wide.png")
    zero = Image.new("L", (256, 256))
    Image.merge("RGB", [zero, zero, ramp]).resize((64, 64)).save(folder / "square.png")
    return folder


def test_latents_are_cached_per_content_and_flip_and_reused_from_disk(tmp_path):
    folder = _folder(tmp_path)
    vae = load_base("tiny:sd1").vae
    scan = scan_folder(folder, "zk", resolution=64)
    cache = LatentCache(vae, scan, "cpu", tmp_path / "cache")
    cache.fill(scan.examples, (False, True))
    assert (cache.misses, cache.hits) == (4, 0)
    latent, crop = cache.get(scan.examples[0])
    assert cache.hits == 1 and latent.shape == (1, 4, 8, 8) and crop == (0, 0)
    flipped, _ = cache.get(scan.examples[0], flip=True)
    assert not torch.equal(latent, flipped)
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 4

    # A second run reads the folder; an edited image gets a fresh entry.
    Image.new("RGB", (64, 64), "green").save(folder / "square.png")
    again = scan_folder(folder, "zk", resolution=64)
    second = LatentCache(vae, again, "cpu", tmp_path / "cache")
    second.fill(again.examples, (False, True))
    assert (second.disk_hits, second.misses) == (2, 2)
    assert torch.equal(second.get(again.examples[1])[0], cache.get(scan.examples[1])[0])
    assert not torch.equal(second.get(again.examples[0])[0], latent)


def test_uncached_and_random_crop_encode_every_time(tmp_path):
    folder = _folder(tmp_path)
    vae = load_base("tiny:sd1").vae
    scan = scan_folder(folder, "zk", resolution=64)
    off = LatentCache(vae, scan, "cpu", enabled=False)
    off.get(scan.examples[0])
    off.get(scan.examples[0])
    assert not off.memory and off.misses == 0
    on = LatentCache(vae, scan, "cpu")
    on.get(scan.examples[0], crop="random")
    assert not on.memory


def test_text_cache_encodes_each_caption_once():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.randn(len(captions), 77, 8), None

    cache = TextCache(encode)
    a, _ = cache(["x", "y", "x"])
    b, _ = cache(["y", "x"])
    assert calls == [["x", "y"]] and torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])


def cache_run(folder, cache_dir, base_name: str) -> dict:
    """One run's caching, as train() does it: every latent, then every caption's encoding."""
    from sdlora.train import encode_text

    folder, cache_dir, base = Path(folder), Path(cache_dir), load_base(base_name)
    scan = scan_folder(folder, "zk", resolution=64)
    latents = LatentCache(base.vae, scan, "cpu", cache_dir)
    latents.fill(scan.examples, (False, True))
    encoded = []

    def encode(captions):
        encoded.extend(captions)
        return encode_text(base, captions, "cpu")

    text = TextCache(encode, cache_dir=cache_dir, fingerprint=text_fingerprint(base), device="cpu")
    hidden, pooled = text([e.caption for e in scan.examples])
    return {
        "latent_misses": latents.misses,
        "latent_disk_hits": latents.disk_hits,
        "latents": [latents.get(e)[0].sum().item() for e in scan.examples],
        "encoded": encoded,
        "text_disk_hits": text.disk_hits,
        "hidden": hidden.sum(dim=(1, 2)).tolist(),
        "pooled": None if pooled is None else pooled.sum(dim=1).tolist(),
    }


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_cache import cache_run
print(json.dumps(cache_run(*sys.argv[2:])))
"""


def test_another_process_reuses_every_cached_latent_and_caption(tmp_path):
    folder = _folder(tmp_path)
    (folder / "wide.txt").write_text("a ramp")
    (folder / "square.txt").write_text("a blue square")
    cache_dir = tmp_path / "cache"
    first = cache_run(folder, cache_dir, "tiny:sd1")
    assert (first["latent_misses"], first["latent_disk_hits"]) == (4, 0)
    assert first["encoded"] == ["zk, a blue square", "zk, a ramp"]
    latent_files = sorted((cache_dir / "latents").iterdir())
    assert len(latent_files) == 4 and len(list((cache_dir / "text").iterdir())) == 2

    # Another process (its own hash seed, so its own set orders): the same keys are found;
    # only the edited caption is encoded.
    (folder / "wide.txt").write_text("a dark ramp")
    here = str(Path(__file__).parent)
    command = [sys.executable, "-c", CHILD, here, str(folder), str(cache_dir), "tiny:sd1"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout.splitlines()[-1])
    assert (again["latent_misses"], again["latent_disk_hits"]) == (0, 4)
    assert sorted((cache_dir / "latents").iterdir()) == latent_files
    assert again["latents"] == first["latents"]
    assert again["encoded"] == ["zk, a dark ramp"] and again["text_disk_hits"] == 1
    assert again["hidden"][0] == first["hidden"][0]  # square.png's, read back from disk
    assert len(list((cache_dir / "text").iterdir())) == 3


def test_sdxl_text_outputs_come_back_from_disk_with_their_pooled_embeddings(tmp_path):
    from sdlora.train import encode_text

    base = load_base("tiny:sdxl")
    captions = ["zk, a ramp", "zk, a square"]
    fingerprint = text_fingerprint(base)
    first = TextCache(
        lambda c: encode_text(base, c, "cpu"), cache_dir=tmp_path, fingerprint=fingerprint
    )
    hidden, pooled = first(captions)
    second = TextCache(None, cache_dir=tmp_path, fingerprint=fingerprint)  # never encodes
    again_hidden, again_pooled = second(captions[::-1])
    assert second.disk_hits == 2 and pooled.shape == again_pooled.shape == (2, 32)
    assert torch.equal(again_hidden, hidden.flip(0)) and torch.equal(again_pooled, pooled.flip(0))
    other = TextCache(None, cache_dir=tmp_path, fingerprint=text_fingerprint(load_base("tiny:sd1")))
    with pytest.raises(TypeError):  # another base's fingerprint finds nothing: it must encode
        other(captions)


def test_fingerprints_ignore_private_config_keys_and_follow_the_weights():
    base = load_base("tiny:sd1")
    before_vae, before_text = vae_fingerprint(base.vae), text_fingerprint(base)
    base.vae.register_to_config(_use_default_values=["b", "a"], _name_or_path="elsewhere")
    assert vae_fingerprint(base.vae) == before_vae
    assert text_fingerprint(base, clip_skip=2) != before_text
    with torch.no_grad():
        next(base.text_encoder.parameters()).view(-1)[0] += 1
    assert text_fingerprint(base) != before_text
    assert text_fingerprint(load_base("tiny:sd2")) != before_text


def test_a_trained_text_encoder_is_neither_cached_nor_stored(tmp_path):
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.randn(len(captions), 77, 8), None

    cache = TextCache(encode, False, cache_dir=tmp_path, fingerprint="f")
    cache(["x"])
    cache(["x"])
    assert calls == [["x"], ["x"]] and not (tmp_path / "text").exists()


def test_batches_come_from_one_bucket_and_honour_repeats():
    buckets = [(64, 64), (64, 64), (128, 64), (64, 128), (128, 64)]
    repeats = [1, 2, 1, 3, 1]
    gen = torch.Generator().manual_seed(0)
    order = bucket_batches(buckets, repeats, batch_size=2, generator=gen)
    seen = []
    assert batches_per_epoch(buckets, repeats, batch_size=2) == 5
    for _ in range(5):  # one epoch: 2 + 1 + 2 batches
        batch = next(order)
        assert len({buckets[i] for i in batch}) == 1
        seen += batch
    assert sorted(seen) == [0, 1, 1, 2, 3, 3, 3, 4]


def test_sdxl_trains_on_buckets_with_each_images_size_and_crop(tmp_path):
    from conftest import tiny_overrides

    from sdlora import load_config
    from sdlora.step import added_cond, assemble_batch
    from sdlora.train import train

    folder = _folder(tmp_path)  # 128x64 and 64x64
    overrides = tiny_overrides(folder, tmp_path / "run", steps=2) + [
        "model.base=tiny:sdxl",
        "dataset.resolution=128",
        "train.batch_size=1",
        "sample.report_images=0",
    ]
    config = load_config(None, overrides)
    result = train(config, progress=False)
    scan_ = scan_folder(folder, "zk", resolution=128)
    assert [e.bucket for e in scan_.examples] == [(128, 128), (192, 64)]
    cache = LatentCache(result.base.vae, scan_, "cpu")
    batch = assemble_batch(scan_, [1], cache, config.dataset, rng=None)
    latents, geometry = batch.latents, batch.geometry
    assert latents.shape == (1, 4, 8, 24)
    # original (h, w), crop (top, left) after scaling 128x64 by 1.5 to 192x96, target (h, w)
    assert geometry == [(64, 128, 16, 0, 64, 192)]
    ids = added_cond(result.base, torch.zeros(1, 8), geometry, "cpu")["time_ids"]
    assert ids.tolist() == [[64, 128, 16, 0, 64, 192]]


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: b"not a safetensors file",
    "other tensors": lambda data: save({"x": torch.zeros(2)}),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latent_entry_is_reported_removed_and_computed_again(tmp_path, damage):
    folder = _folder(tmp_path)
    vae = load_base("tiny:sd1").vae
    scan = scan_folder(folder, "zk", resolution=64)
    first = LatentCache(vae, scan, "cpu", tmp_path / "cache")
    first.fill(scan.examples, (False,))
    damaged = tmp_path / "cache" / "latents" / f"{first.key(scan.examples[0], False)}.safetensors"
    damaged.write_bytes(DAMAGE[damage](damaged.read_bytes()))

    second = LatentCache(vae, scan, "cpu", tmp_path / "cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.fill(scan.examples, (False,))
    assert [str(w.message).count(str(damaged)) for w in caught] == [1]
    assert (second.misses, second.disk_hits) == (1, 1)
    for example in scan.examples:
        assert torch.equal(second.get(example)[0], first.get(example)[0])
    assert torch.equal(load_file(damaged)["latent"], first.get(scan.examples[0])[0])  # rewritten


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_text_entry_is_reported_removed_and_encoded_again(tmp_path, damage):
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.arange(len(captions) * 6.0).reshape(len(captions), 2, 3), None

    TextCache(encode, cache_dir=tmp_path, fingerprint="f")(["x", "y"])
    cache = TextCache(encode, cache_dir=tmp_path, fingerprint="f")
    damaged = tmp_path / "text" / f"{cache.key('y')}.safetensors"
    damaged.write_bytes(DAMAGE[damage](damaged.read_bytes()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hidden, _ = cache(["x", "y"])
    assert [str(w.message).count(str(damaged)) for w in caught] == [1]
    assert calls == [["x", "y"], ["y"]] and cache.disk_hits == 1
    assert torch.equal(hidden[1], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(load_file(damaged)["hidden"], hidden[1])  # rewritten


def test_training_goes_on_past_a_damaged_cache_file_with_one_warning(style_dir, tmp_path, capsys):
    from conftest import tiny_overrides

    from sdlora.cli import main

    config = tmp_path / "c.toml"
    config.write_text("")
    common = [f"dataset.cache_dir={tmp_path / 'cache'}", "sample.report_images=0", "--no-progress"]
    assert main(["train", str(config), *tiny_overrides(style_dir, tmp_path / "a", 1), *common]) == 0
    damaged = sorted((tmp_path / "cache" / "latents").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", str(config), *tiny_overrides(style_dir, tmp_path / "b", 1), *common]) == 0
    err = capsys.readouterr().err
    named = [line for line in err.splitlines() if damaged.name in line]
    assert len(named) == 1 and named[0].startswith(f"sdlora: warning: cache file {damaged} "), err
    assert "Traceback" not in err and load_file(damaged)["latent"].shape == (1, 4, 8, 8)
