"""The validation loss: which images, fixed timesteps and noise, logs, and training untouched."""

import json
import shutil
import sys

import pytest
import torch
from conftest import EXAMPLES, tiny_overrides
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdlora import load_config, train
from sdlora.dataset import scan_folder
from sdlora.errors import SdloraError
from sdlora.validation import (
    FOLDER,
    HELD_OUT,
    TRAINING,
    TRAINING_IMAGES_MAX,
    choose_validation,
    fixed_timesteps,
)


def _run(style_dir, out, steps, *extra):
    overrides = tiny_overrides(style_dir, out, steps) + ["sample.report_images=0", *extra]
    return load_config(None, overrides)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["dataset.validation_split=1"], r"validation_split must be in \[0, 1\)"),
        (["dataset.validation_split=-0.1"], r"validation_split must be in \[0, 1\)"),
        (["dataset.validation_split=0.2", "dataset.validation_path=/tmp"], "both set"),
        (["train.validate_every=-1"], "train.validate_every must be >= 0"),
        (["dataset.validation_split=true"], "validation_split must be float"),
    ],
)
def test_validation_settings_are_checked(style_dir, tmp_path, extra, message):
    with pytest.raises(SdloraError, match=message):
        _run(style_dir, tmp_path / "run", 2, *extra)


def test_a_validation_folder_inside_the_dataset_is_refused(style_dir, tmp_path):
    with pytest.raises(SdloraError, match="inside dataset.path, so its images would be trained"):
        _run(style_dir, tmp_path / "run", 2, f"dataset.validation_path={style_dir / 'val'}")


def test_a_split_holds_images_out_of_training_the_same_way_each_time(style_dir):
    scan = scan_folder(style_dir, "zkstripes", resolution=64)
    kept, images = choose_validation(scan, 0.34, seed=0)
    assert images.source == HELD_OUT and len(images.examples) == 2 and len(kept.examples) == 4
    assert {e.path for e in kept.examples}.isdisjoint(e.path for e in images.examples)
    assert len(scan.examples) == 6  # the scan itself is left as it was
    again = choose_validation(scan, 0.34, seed=0)[1]
    assert [e.path for e in again.examples] == [e.path for e in images.examples]
    other = choose_validation(scan, 0.34, seed=5)[1]
    assert [e.path for e in other.examples] != [e.path for e in images.examples]


@pytest.mark.parametrize("split", [0.0, 0.05, 0.95])
def test_without_a_usable_split_the_training_images_validate_and_say_so(style_dir, split):
    scan = scan_folder(style_dir, "zkstripes", resolution=64)
    kept, images = choose_validation(scan, split, seed=0)
    assert kept is scan and images.source == TRAINING
    assert images.examples == scan.examples
    assert images.note.startswith("validation on training images")
    if split:
        assert f"validation_split={split} of 6 images holds out" in images.note


def test_many_training_images_are_capped_evenly(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    from PIL import Image

    for i in range(40):
        Image.new("RGB", (64, 64), (i * 6, 255 - i * 6, 0)).save(folder / f"{i:02d}.png")
    scan = scan_folder(folder, "zk", resolution=64)
    _, images = choose_validation(scan, 0.0, seed=0)
    assert len(images.examples) == TRAINING_IMAGES_MAX - 2  # every third of 40: 14
    assert images.examples[1] == scan.examples[3]


def test_fixed_timesteps_are_the_midpoints_of_four_slices():
    assert fixed_timesteps(1000).tolist() == [125, 375, 625, 875]


def test_an_empty_validation_folder_is_refused(style_dir, tmp_path):
    empty = tmp_path / "val"
    empty.mkdir()
    config = _run(style_dir, tmp_path / "run", 2, f"dataset.validation_path={empty}")
    with pytest.raises(SdloraError, match="validation_path .* has no usable images"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "style.safetensors").exists()


def test_held_out_validation_is_logged_at_start_every_n_steps_and_end(style_dir, tmp_path):
    out = tmp_path / "run"
    config = _run(style_dir, out, 3, "dataset.validation_split=0.34", "train.validate_every=2")
    result = train(config, progress=False)
    log = _log(out)
    val = [e for e in log if "val_loss" in e]
    assert [e["step"] for e in val] == [0, 2, 3]
    assert all(e["val_images"] == HELD_OUT and e["val_loss"] > 0 for e in val)
    assert [e["loss"] for e in log if "loss" in e] == result.losses  # readers of "loss" still work
    report = json.loads((out / "run.json").read_text())
    assert report["images"] == 4  # two of six held out
    v = report["validation"]
    assert v["images"] == HELD_OUT and v["count"] == 2 and v["timesteps"] == [125, 375, 625, 875]
    assert [(x["step"], x["val_loss"]) for x in v["losses"]] == [
        (e["step"], e["val_loss"]) for e in val
    ]
    (events,) = (out / "logs").rglob("events.out.tfevents*")  # one file: trackers stay open
    scalars = EventAccumulator(str(events)).Reload().Scalars("val/loss")
    assert [(s.step, s.value) for s in scalars] == [
        (e["step"], pytest.approx(e["val_loss"], rel=1e-6)) for e in val
    ]


def test_a_validation_folder_is_scanned_like_the_dataset(style_dir, tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for image in sorted(EXAMPLES.glob("*.png"))[6:8]:
        shutil.copy(image, val / image.name)
    (val / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    train(_run(style_dir, out, 1, f"dataset.validation_path={val}"), progress=False)
    val_lines = [e for e in _log(out) if "val_loss" in e]
    assert [e["step"] for e in val_lines] == [0, 1]
    assert all(e["val_images"] == FOLDER for e in val_lines)
    report = json.loads((out / "run.json").read_text())
    assert report["validation"]["count"] == 2 and report["images"] == 6


def test_validation_leaves_training_bit_identical(style_dir, tmp_path, monkeypatch):
    # Flips, a trained text encoder and mixed augmentation: every stream validation could touch.
    extra = ["dataset.flip=true", "train.validate_every=1", "train.save_every=2",
             "output.dtype=fp32", "train.noise_offset=0.05"]  # fmt: skip
    with_val = tmp_path / "with"
    train(_run(style_dir, with_val, 4, *extra), progress=False)
    losses = [e["val_loss"] for e in _log(with_val) if "val_loss" in e]
    assert len(losses) == 5 and len(set(losses)) == 5  # measured at 0..4, and they move

    evaluate = sys.modules["sdlora.evaluate"]
    monkeypatch.setattr(evaluate, "validation_loss", lambda *args, **kwargs: 1.0)
    without = tmp_path / "without"
    train(_run(style_dir, without, 4, *extra), progress=False)
    for name in ("style.safetensors", "style-step000002.safetensors"):
        a, b = load_file(with_val / name), load_file(without / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    train_losses = [[e["loss"] for e in _log(out) if "loss" in e] for out in (with_val, without)]
    assert train_losses[0] == train_losses[1]


def test_the_validation_loss_is_the_same_for_the_same_weights(style_dir, tmp_path):
    out = tmp_path / "run"
    train(_run(style_dir, out, 2, "train.lr=1e-9"), progress=False)  # all but unchanged
    first, last = (e["val_loss"] for e in _log(out) if "val_loss" in e)
    assert first == pytest.approx(last, rel=1e-4)
