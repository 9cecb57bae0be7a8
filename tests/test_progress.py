"""Which step is the good one: the rule, the checkpoints' records, the pictures."""

import json

import pytest
from conftest import tiny_overrides
from PIL import Image

from sdlora import load_config, train
from sdlora.errors import SdloraError
from sdlora.progress import VAL, best_line, best_step, checkpoint_grid, save_progress_plot
from sdlora.report import SCORE_KEYS


def _entry(step, val, shift=None, drift=None, lora=True):
    return {
        "step": step,
        "val_loss": val,
        "style_shift_with_trigger": shift,
        "drift_without_trigger": drift,
        "lora": f"style-step{step:06d}.safetensors" if lora else None,
    }


def test_the_rule_takes_strong_style_without_drift_or_rising_validation():
    entries = [
        _entry(100, 1.00, 0.30, 0.00),
        _entry(200, 0.90, 0.70, 0.05),
        _entry(300, 0.85, 0.90, 0.20),  # strongest, but leaks into prompts without the trigger
        _entry(400, 0.95, 0.95, 0.02),  # strongest that does not leak, but overfitting
    ]
    chosen, why = best_step(entries)
    assert chosen["step"] == 200
    assert why == "strongest style with the trigger (validation loss not rising, |drift| <= 0.1)"


def test_a_drift_away_from_the_style_counts_as_drift():
    entries = [
        _entry(100, 1.00, 0.70, 0.02),
        _entry(200, 0.90, 0.95, -0.30),  # strongest, but redraws prompts without the trigger
    ]
    assert best_step(entries)[0]["step"] == 100
    everywhere = [_entry(100, 1.0, 0.9, -0.40), _entry(200, 0.9, 0.6, 0.15)]
    chosen, why = best_step(everywhere)
    assert chosen["step"] == 200 and "the least drift" in why


def test_equally_strong_styles_go_to_the_lower_validation_loss():
    entries = [_entry(100, 0.8, 0.80, 0.0), _entry(200, 0.81, 0.83, 0.0), _entry(300, 0.7, 0.5, 0)]
    assert best_step(entries)[0]["step"] == 100
    assert best_step(entries, margin=0.01)[0]["step"] == 200
    tied = [_entry(100, 0.8, 0.80, 0.0), _entry(200, 0.8, 0.81, 0.0)]
    assert best_step(tied)[0]["step"] == 100


def test_when_every_step_drifts_the_least_drift_is_taken():
    entries = [_entry(100, 1.0, 0.9, 0.40), _entry(200, 0.9, 0.6, 0.15), _entry(300, 0.8, 0.7, 0.3)]
    chosen, why = best_step(entries)
    assert chosen["step"] == 200 and "every checkpoint drifts over 0.1: the least drift" in why


def test_without_style_scores_the_lowest_validation_loss_wins():
    entries = [_entry(100, 1.0), _entry(200, 0.7), _entry(300, 0.7), _entry(400, 0.9)]
    chosen, why = best_step(entries)
    assert chosen["step"] == 200 and why.startswith("lowest validation loss")


def test_only_steps_with_a_lora_file_are_chosen():
    entries = [_entry(100, 0.5, 0.9, 0.0, lora=False), _entry(200, 0.6, 0.5, 0.0)]
    assert best_step(entries)[0]["step"] == 200
    assert best_step([_entry(100, 0.5, lora=False)]) is None


def test_a_rising_validation_loss_is_measured_from_the_lowest_so_far():
    entries = [_entry(100, 1.0, 0.5, 0.0), _entry(200, 0.8, 0.6, 0.0), _entry(300, 0.83, 0.9, 0)]
    assert best_step(entries)[0]["step"] == 200  # 0.83 is 3.8% above 0.8
    assert best_step(entries, val_rise=0.05)[0]["step"] == 300


def test_the_best_line_says_why_in_one_line():
    entries = [_entry(100, 1.0, 0.3, 0.0), _entry(200, 0.9, 0.81, 0.03), _entry(300, 0.8, 0.9, 0.3)]
    line = best_line(*best_step(entries), entries)
    assert "\n" not in line
    assert line.startswith("best step: 200 — style 0.81, drift 0.03, val loss 0.9 (+12.5% over ")
    assert line.endswith("; chosen for: strongest style with the trigger (validation loss not "
                         "rising, |drift| <= 0.1)")  # fmt: skip


def test_progress_plot_and_checkpoint_grid(tmp_path):
    entries = [_entry(2, 0.5, 0.2, 0.0), _entry(4, 0.45, 0.6, 0.05)]
    path = save_progress_plot([0.6, 0.5, 0.55, 0.4], [(0, 0.6), (2, 0.5), (4, 0.45)], entries, 4,
                              tmp_path / "progress.png")  # fmt: skip
    image = Image.open(path).convert("RGB")
    assert image.size == (720, 480) and VAL in {c for _, c in image.getcolors(100000)}
    grids = []
    for i, colour in enumerate(("red", "blue")):
        grids.append(tmp_path / f"g{i}.png")
        Image.new("RGB", (40, 30), colour).save(grids[-1])
    grid = Image.open(checkpoint_grid(grids, tmp_path / "c.png", "t"))
    assert grid.size == (40, 16 + 60) and grid.getpixel((5, 16 + 35)) == (0, 0, 255)
    assert checkpoint_grid(grids[:1], tmp_path / "d.png", "t") is None


def test_a_run_judges_each_checkpoint_and_copies_the_best(style_dir, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(style_dir, out, 4) + [
        "train.save_every=2",
        "sample.checkpoint_images=2",
        "output.dtype=fp32",
    ]
    train(load_config(None, overrides), progress=False)
    entries = json.loads((out / "checkpoints.json").read_text())
    assert [e["step"] for e in entries] == [2, 4]
    assert [e["lora"] for e in entries] == ["style-step000002.safetensors", "style.safetensors"]
    for e in entries:
        assert e["val_loss"] > 0 and e["eval_s"] > 0
        for key in SCORE_KEYS:  # the VAE Gram's and the palette's
            assert isinstance(e[key], float), key
    report = json.loads((out / "run.json").read_text())
    assert report["checkpoints"] == entries
    best = report["best_step"]
    chosen = next(e for e in entries if e["step"] == best["step"])
    assert (out / "style-best.safetensors").read_bytes() == (out / chosen["lora"]).read_bytes()
    assert (out / "progress.png").is_file() and (out / "checkpoints.png").is_file()
    assert (out / "samples" / "step_000002.png").is_file()  # sampled at the checkpoint
    printed = capsys.readouterr().out
    assert printed.count("best step: ") == 1 and f"best step: {best['step']} — " in printed


@pytest.mark.parametrize("images", ["sample.report_images=0", "sample.checkpoint_images=0"])
def test_without_report_images_checkpoints_have_no_style_scores(style_dir, tmp_path, images):
    out = tmp_path / "run"
    overrides = tiny_overrides(style_dir, out, 2) + ["train.save_every=1", images]
    train(load_config(None, overrides), progress=False)
    entries = json.loads((out / "checkpoints.json").read_text())
    assert [e["step"] for e in entries] == [1, 2]
    assert all(e[key] is None for e in entries for key in SCORE_KEYS)
    best = json.loads((out / "run.json").read_text())["best_step"]
    assert best["why"].startswith("lowest validation loss")
    lowest = min(entries, key=lambda e: e["val_loss"])
    assert best["step"] == lowest["step"] and (out / "style-best.safetensors").is_file()


def test_a_run_without_checkpoints_has_nothing_to_choose(style_dir, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "style-best.safetensors").write_bytes(b"an earlier run's")
    overrides = tiny_overrides(style_dir, out, 1) + [
        "sample.report_images=0",
        "output.overwrite=true",
    ]
    train(load_config(None, overrides), progress=False)
    assert [e["step"] for e in json.loads((out / "checkpoints.json").read_text())] == [1]
    assert not (out / "style-best.safetensors").exists() and not (out / "checkpoints.png").exists()
    assert (out / "progress.png").is_file()


def test_a_fresh_run_leaves_nothing_of_an_earlier_one_and_keeps_what_is_not_its(
    style_dir, tmp_path
):
    out = tmp_path / "run"
    earlier = [  # a 400-step run of the same name: what a 1-step run would not write again
        out / "style-step000400.safetensors",
        out / "checkpoints" / "step_000400" / "COMPLETE",
        out / "samples" / "step_000400.png",
        out / "logs" / "logs" / "events.out.tfevents.1.host",
        out / "learning_report.json",
    ]
    theirs = [out / "notes.txt", out / "samples" / "mine.png", out / "other-step000001.safetensors"]
    for path in earlier + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"earlier")
    overrides = tiny_overrides(style_dir, out, 1) + ["sample.report_images=0"]
    # Without overwrite the earlier run may be the one to resume: refused, nothing touched.
    with pytest.raises(
        SdloraError, match=r"checkpoints/step_000400\); resume it with train.resume=latest"
    ):
        train(load_config(None, overrides), progress=False)
    assert all(p.exists() for p in earlier + theirs)
    train(load_config(None, [*overrides, "output.overwrite=true"]), progress=False)
    assert not any(p.exists() for p in earlier)
    assert not (out / "checkpoints" / "step_000400").exists()
    assert all(p.read_bytes() == b"earlier" for p in theirs)
    assert (out / "style.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").glob("step_*.png")) == [
        f"step_{s:06d}.png" for s in (0, 1)
    ]
