"""Folders built to trip the scan: named pipes, links out of the folder, formats that are not
read, fewer images than a batch, and file names with control characters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from sdlora.cli import main
from sdlora.dataset import scan_folder
from sdlora.epochs import epoch_plan
from sdlora.errors import SdloraError
from sdlora.preflight import display_width, summarise_problems


def _image(path, colour, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _names(problems, root):
    return {str(p.path.relative_to(root)): p.reason for p in problems}


def test_a_named_pipe_and_a_link_to_the_root_do_not_stall_check(tmp_path):
    folder = tmp_path / "set"
    for name, colour in (("a.png", "red"), ("b.png", "green"), ("c.png", "blue")):
        _image(folder / name, colour)
    os.mkfifo(folder / "pipe.png")  # opening it for reading waits for a writer, forever
    os.mkfifo(folder / "b.txt")  # a caption that is a pipe
    os.symlink("/", folder / "everything")
    command = [sys.executable, "-m", "sdlora", "check", str(folder), "--resolution", "64"]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"pipe.png", "everything"}
    assert skipped["pipe.png"].startswith("not a regular file: a named pipe (FIFO)")
    assert "leads outside the dataset folder (to /)" in skipped["everything"]
    assert "dataset.follow_external_links=true" in skipped["everything"]
    warnings = {w["file"]: w["reason"] for w in report["warnings"]}
    assert "named pipe" in warnings["b.txt"] and report["usable"] == 3


def test_links_inside_are_followed_and_outside_only_when_allowed(tmp_path):
    outside = tmp_path / "outside"
    _image(outside / "o.png", "yellow")
    (outside / "cap.txt").write_text("a secret caption")
    folder = tmp_path / "set"
    _image(folder / "a.png", "red")
    _image(folder / "b.png", "green")
    _image(folder / "sub" / "s.png", "blue")
    _image(folder / ".store" / "only.png", "white")  # a dot folder: reached by its link only
    os.symlink(".store/only.png", folder / "linked.png")
    os.symlink("sub", folder / "zz_alias")  # a second way into sub: walked once
    os.symlink("..", folder / "sub" / "up")  # a loop
    os.symlink(outside, folder / "ext")
    os.symlink(outside / "o.png", folder / "ext.png")
    os.symlink(outside / "cap.txt", folder / "a.txt")
    os.symlink("/dev/null", folder / "null.png")
    os.symlink("/proc/self/fdinfo", folder / "proc")

    scan = scan_folder(folder, "zk", resolution=64)
    assert {str(e.path.relative_to(folder)) for e in scan.examples} == {
        "a.png",
        "b.png",
        "linked.png",
        "sub/s.png",
    }
    skipped = _names(scan.skipped, folder)
    assert set(skipped) == {"ext", "ext.png", "null.png", "proc"}
    for name in ("ext", "ext.png"):
        assert f"leads outside the dataset folder (to {outside}" in skipped[name]
    assert skipped["null.png"].startswith("link into /dev (/dev/null)")
    assert skipped["proc"].startswith("link into /proc") and "never" in skipped["proc"]
    caption = _names(scan.warnings, folder)["a.txt"]
    assert caption.startswith("caption not read: link leads outside")
    assert scan.examples[0].caption == "zk"  # the template, not the outside file

    allowed = scan_folder(folder, "zk", resolution=64, follow_external_links=True)
    used = {str(e.path.relative_to(folder)): e.caption for e in allowed.examples}
    assert "ext.png" in used and used["a.png"] == "zk, a secret caption"
    skipped = _names(allowed.skipped, folder)
    assert skipped["ext/o.png"] == "duplicate of ext.png"  # read through the folder link too
    assert set(skipped) == {"ext/o.png", "null.png", "proc"}  # system folders: never


def test_a_folder_without_usable_images_says_why(tmp_path, capsys):
    layered = tmp_path / "layered"
    layered.mkdir()
    (layered / "one.psd").write_bytes(b"8BPS")
    (layered / "two.avif").write_bytes(b"\x00\x00\x00\x1cftypavif")
    (layered / "notes.txt").write_text("not an image")
    assert main(["check", str(layered), "--resolution", "64"]) == 2
    text = capsys.readouterr().out
    for name in ("one.psd", "two.avif"):
        assert re.search(rf"skipped +{name} +format not supported: convert to PNG or JPEG", text)
    assert "notes.txt" not in text and "see the reasons above" in text
    with pytest.raises(SdloraError, match=r"2 skipped: one.psd: format not supported"):
        scan_folder(layered, "zk", resolution=64).require_examples()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["check", str(empty), "--resolution", "64"]) == 2
    assert "no image files found (.jpg, .jpeg, .png" in capsys.readouterr().out

    tiffs = tmp_path / "tiffs"
    for i, colour in enumerate(("red", "green", "blue")):
        _image(tiffs / f"{i}.tif", colour)
    assert main(["check", str(tiffs), "--resolution", "64"]) == 0
    assert "3 usable, 0 skipped" in capsys.readouterr().out


def test_fewer_images_than_the_batch_size_is_warned_with_the_effective_batch(tmp_path):
    for i, colour in enumerate(("red", "green", "blue", "white")):
        _image(tmp_path / "four" / f"{i}.png", colour)
    four = scan_folder(tmp_path / "four", "zk", resolution=64, repeats=1)
    plan = epoch_plan(four, 10, batch_size=8)
    assert "(1 steps of batch 8)" in plan
    assert "train.batch_size=8 but an epoch holds only 4 images" in plan
    assert "effective batch size is 4;" in plan
    assert "4 x grad_accum 2 = 8" in epoch_plan(four, 10, batch_size=8, grad_accum=2)
    assert "warning" not in epoch_plan(four, 10, batch_size=4)
    assert "warning" not in epoch_plan(scan_folder(tmp_path / "four", "zk", 64), 10, 8)  # x25

    _image(tmp_path / "mixed" / "wide0.png", "red", (256, 128))
    _image(tmp_path / "mixed" / "wide1.png", "green", (256, 128))
    _image(tmp_path / "mixed" / "square.png", "blue", (128, 128))
    mixed = scan_folder(tmp_path / "mixed", "zk", resolution=128, repeats=1)
    assert len(mixed.bucket_counts()) == 2
    assert "the fullest bucket holds only 2 images" in epoch_plan(mixed, 10, batch_size=3)


def test_control_characters_in_names_are_escaped_on_output(tmp_path, capsys):
    folder = tmp_path / "names"
    names = ["new\nline.png", "esc\x1b[31mred.png", "rtl\u202egnp.exe.png", "風景画.png"]
    for i, name in enumerate(names):
        _image(folder / name, (i * 40, 0, 0))
    (folder / "new\nline copy.png").write_bytes((folder / names[0]).read_bytes())
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"not a png")

    assert main(["check", str(folder), "--resolution", "64"]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\u202e" not in text
    rows = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(rows) == 7  # one line per file, and the folder's
    assert any("skipped  bad\\xff.png" in row for row in rows)
    assert any("duplicate of new\\nline copy.png" in row for row in rows)
    sized = [row for row in rows if "64x64 -> 64x64" in row]
    assert len({display_width(row.split("64x64 ->")[0]) for row in sized}) == 1  # aligned

    assert main(["check", str(folder), "--resolution", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    files = {f["file"] for f in report["files"]}
    assert {"new\\nline.png", "esc\\x1b[31mred.png", "rtl\\u202egnp.exe.png"} <= files
    assert "bad\\xff.png" in files and "風景画.png" in files

    lines = summarise_problems(scan_folder(folder, "zk", resolution=64))  # training's output
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert any("skipped new\\nline.png: duplicate" in line for line in lines)
