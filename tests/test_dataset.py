"""The dataset on a messy folder: every problem reported by file, images normalised, folder
left untouched, and training on what is usable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_overrides
from messy import make_messy, make_read_only, make_writable, snapshot
from PIL import Image

from sdlora.cli import main
from sdlora.configfile import load_config
from sdlora.dataset import auto_repeats, load_pixels, scan_folder
from sdlora.errors import SdloraError
from sdlora.preflight import display_width


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("messy") / "style"
    expected = make_messy(folder)
    return folder, expected


@pytest.fixture(scope="module")
def scan(messy):
    folder, _ = messy
    return scan_folder(folder, "zkstyle", resolution=64)


def _by_name(problems, root):
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(str(p.path.relative_to(root)), []).append(p.reason)
    return out


def test_every_unusable_file_is_skipped_by_name_with_its_reason(messy, scan):
    folder, expected = messy
    assert (folder / "bomb.png").stat().st_size <= 68  # declares 20000 x 20000
    skipped = _by_name(scan.skipped, folder)
    assert set(skipped) == set(expected["skipped"])
    for name, words in expected["skipped"].items():
        assert words in skipped[name][0], (name, skipped[name])
    usable = {str(e.path.relative_to(folder)) for e in scan.examples}
    assert usable == expected["usable"]


def test_warnings_name_the_file(messy, scan):
    folder, expected = messy
    warnings = _by_name(scan.warnings, folder)
    for name, words in expected["warnings"].items():
        assert any(words in reason for reason in warnings.get(name, [])), (name, warnings)
    long = next(r for r in warnings["long.png"] if "CLIP tokens" in r)
    assert int(long.split("at least ")[1].split()[0]) > 77


def test_ignored_files_and_order(messy, scan):
    folder, _ = messy
    names = [str(e.path.relative_to(folder)) for e in scan.examples]
    assert names == sorted(names, key=lambda n: ("/" in n, n))  # sorted, sub-folder after
    everything = {str(p.path.relative_to(folder)) for p in scan.skipped + scan.warnings}
    assert not any("hidden" in n or "MACOSX" in n or "Thumbs" in n for n in names)
    assert not any("hidden" in n or "MACOSX" in n or "readme" in n for n in everything)
    assert not any(n.endswith(".json") for n in everything)
    assert names.count("UPPER.JPG") == 1
    assert not any("loop" in n for n in names)  # the symlink loop is entered once, at most


def test_captions_are_normalised_and_triggered(messy, scan):
    folder, _ = messy
    captions = {str(e.path.relative_to(folder)): e.caption for e in scan.examples}
    assert captions["bom.png"] == "zkstyle, a hill, at dusk"
    assert captions["crlf.jpg"] == "zkstyle, a lake, mist"
    assert captions["good.png"] == "zkstyle, a red barn, fields"
    assert captions["cp1252.png"] == "zkstyle"  # unreadable caption: the template
    assert captions["a.jpg"] == captions["a.png"] == "zkstyle, shared caption"


def test_repeats_from_folder_prefix_and_image_count(scan):
    repeats = {e.path.name: e.repeats for e in scan.examples}
    assert repeats["inner.png"] == 3
    assert repeats["good.png"] == auto_repeats(len(scan.examples) - 1)
    assert auto_repeats(5) == 20 and auto_repeats(100) == 1 and auto_repeats(400) == 1


def _pixels(scan, name):
    example = next(e for e in scan.examples if e.path.name == name)
    pixels, _ = load_pixels(scan, example)
    return example, (pixels + 1) * 127.5  # (3, H, W) back to 0..255


def test_images_are_normalised(scan):
    _, transparent = _pixels(scan, "transparent.png")
    assert transparent.min() > 250  # white background, not the hidden red
    _, grey_alpha = _pixels(scan, "grey_alpha.png")
    assert grey_alpha.min() > 250
    _, palette = _pixels(scan, "palette.png")
    right = palette[:, :, 40:]
    assert right.min() > 250
    _, grey = _pixels(scan, "grey16.png")
    assert 120 < grey.mean() < 136  # 32768 / 65535 of white, not clipped to white
    _, cmyk = _pixels(scan, "cmyk.jpg")
    r, g, b = cmyk.mean(dim=(1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60
    rotated, pixels = _pixels(scan, "rotated.jpg")
    assert rotated.size == (64, 96)  # EXIF orientation 6: stored 96x64, displayed 64x96
    assert pixels.shape[1:] == (rotated.bucket[1], rotated.bucket[0])
    _, profiled = _pixels(scan, "wide_gamut.png")
    r, g, b = profiled.mean(dim=(1, 2)).tolist()
    assert g > 200 and r < 30  # converted through its ICC profile to sRGB
    _, grey_tiff = _pixels(scan, "grey16.tif")
    assert 58 < grey_tiff.mean() < 70  # 16384 / 65535 of white
    _, deep = _pixels(scan, "deep.tiff")
    r, g, b = deep.mean(dim=(1, 2)).tolist()
    assert r > 250 and 120 < g < 136 and b < 5  # 48-bit RGB TIFF scaled per channel
    _, gif = _pixels(scan, "animated.gif")
    r, g, b = gif.mean(dim=(1, 2)).tolist()
    assert r > 200 and g < 60  # the first frame (red)


def test_background_colour_is_configurable(messy):
    folder, _ = messy
    black = scan_folder(folder, "zkstyle", resolution=64, background=(0, 0, 0))
    _, pixels = _pixels(black, "transparent.png")
    assert pixels.max() < 5


def test_small_images_can_be_upscaled(messy):
    folder, _ = messy
    scan = scan_folder(folder, "zkstyle", resolution=64, small_images="upscale")
    tiny = [p for p in scan.warnings if p.path.name == "one_pixel.png"]
    assert tiny and "upscaled 64.0x" in tiny[0].reason
    assert any(e.path.name == "one_pixel.png" for e in scan.examples)


def test_buckets_follow_the_aspect_ratio(tmp_path):
    Image.new("RGB", (1024, 512), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (400, 800), "blue").save(tmp_path / "tall.png")
    Image.new("RGB", (600, 600), "green").save(tmp_path / "square.png")
    scan = scan_folder(tmp_path, "zk", resolution=512)
    buckets = {e.path.name: e.bucket for e in scan.examples}
    assert buckets == {"wide.png": (704, 320), "tall.png": (320, 704), "square.png": (512, 512)}
    for w, h in buckets.values():
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
    pixels, crop = load_pixels(scan, scan.examples[2])
    assert pixels.shape == (3, 320, 704) and crop == (16, 0)  # 704x352, centred


def test_wrong_caption_extension_is_loud(tmp_path):
    for i in range(3):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.caption").write_text("a thing")
    scan = scan_folder(tmp_path, "zk", resolution=64)
    assert "NO CAPTIONS USED" in scan.warnings[0].reason
    assert "dataset.caption_ext=.caption" in scan.warnings[0].reason
    assert "only 3 usable images" in scan.warnings[-1].reason
    right = scan_folder(tmp_path, "zk", 64, caption_ext=".caption")
    assert not any("NO CAPTIONS" in p.reason for p in right.warnings)
    assert right.examples[0].caption == "zk, a thing"


def test_check_command_json_and_exit_codes(messy, capsys, tmp_path):
    folder, expected = messy
    code = main(["check", str(folder), "--trigger", "zkstyle", "--resolution", "64", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == len(expected["usable"])
    assert {s["file"] for s in report["skipped"]} == set(expected["skipped"])
    assert all({"file", "reason"} <= set(w) for w in report["warnings"])
    assert report["buckets"] == {"64x64": len(expected["usable"])}
    assert main(["check", str(folder), "--resolution", "64"]) == 0
    text = capsys.readouterr().out
    assert "truncated.jpg" in text and "trainable: yes" in text
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"")
    assert main(["check", str(broken), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["usable"] == 0


def test_training_skips_bad_files_and_leaves_a_read_only_folder_alone(messy, tmp_path):
    folder, expected = messy
    before = snapshot(folder)
    make_read_only(folder)
    try:
        overrides = tiny_overrides(folder, tmp_path / "run", steps=2)
        overrides += ["dataset.trigger=zk", "sample.report_images=0"]
        config = tmp_path / "c.toml"
        config.write_text("")
        assert main(["train", str(config), *overrides, "--no-progress"]) == 0
        assert not os.access(folder, os.W_OK) or os.geteuid() == 0
    finally:
        make_writable(folder)
    after = snapshot(folder)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in before.items()}
    report = json.loads((tmp_path / "run" / "run.json").read_text())
    skipped = {os.path.relpath(s["file"], folder) for s in report["skipped"]}
    assert skipped == set(expected["skipped"])
    assert report["images"] == len(expected["usable"])


def test_cache_dir_inside_the_dataset_is_refused(messy, tmp_path):
    folder, _ = messy
    overrides = tiny_overrides(folder, tmp_path / "run") + [f"dataset.cache_dir={folder}/c"]
    with pytest.raises(SdloraError, match="dataset.cache_dir .* inside dataset.path"):
        load_config(None, overrides)


def test_no_usable_image_is_one_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    scan = scan_folder(tmp_path, "zk", resolution=64)
    with pytest.raises(SdloraError, match="no usable images .*1 skipped"):
        scan.require_examples()


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.crop=diagonal", r"dataset\.crop must be one of center, random"),
        ("dataset.caption_dropout=1.5", r"dataset\.caption_dropout must be in \[0, 1\]"),
        ("dataset.tag_dropout=-0.1", r"dataset\.tag_dropout must be in \[0, 1\]"),
        ("dataset.background=blurple", r"dataset\.background: 'blurple' is not a colour"),
        ("dataset.small_images=keep", r"dataset\.small_images must be one of skip, upscale"),
        ("dataset.keep_tokens=-1", r"dataset\.repeats and dataset\.keep_tokens must be >= 0"),
        ("dataset.max_pixels=0", r"dataset\.max_pixels must be > 0"),
    ],
)
def test_bad_dataset_values_are_named(override, message, tmp_path):
    with pytest.raises(SdloraError, match=message):
        overrides = ["model.base=tiny:sd1", f"dataset.path={tmp_path}", "dataset.trigger=zk"]
        load_config(None, [*overrides, override])


def test_every_dataset_key_is_in_the_readme_table():
    import dataclasses
    from pathlib import Path

    from sdlora.config import DatasetConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for f in dataclasses.fields(DatasetConfig):
        assert f"| `dataset.{f.name}` |" in readme, f.name


def test_check_text_aligns_wide_file_names(tmp_path, capsys):
    folder = tmp_path / "names"
    folder.mkdir()
    names = ("風景画.png", "cafe\u0301.png", "a.png")  # wide, a combining accent, plain
    for name, colour in zip(names, ("red", "green", "blue"), strict=True):
        Image.new("RGB", (64, 64), colour).save(folder / name)
    assert main(["check", str(folder), "--resolution", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "64x64 -> 64x64" in line]
    assert len(rows) == 3
    columns = {display_width(line.split("64x64 ->")[0]) for line in rows}
    assert len(columns) == 1  # the size column starts at the same terminal column on every row


def test_check_piped_into_a_reader_that_has_gone_prints_no_traceback(tmp_path):
    read, write = os.pipe()
    os.close(read)  # like `sdlora check DIR | head -1` once head has exited
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    result = subprocess.run([sys.executable, "-m", "sdlora", "check", str(folder)],
                            stdout=write, stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(write)
    assert result.returncode == 141 and result.stderr == ""


def test_a_folder_that_cannot_be_listed_is_reported_and_the_rest_used(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    (folder / "locked").mkdir(parents=True)
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
    Image.new("RGB", (64, 64), "white").save(folder / "locked" / "hidden.png")
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_folder(folder, "zk", resolution=64)
    assert sorted(e.path.name for e in scan.examples) == ["0.png", "1.png", "2.png"]
    (problem,) = [p for p in scan.skipped if p.path.name == "locked"]
    assert problem.reason == "unreadable folder: Permission denied"
