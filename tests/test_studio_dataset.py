"""The studio's Dataset-screen functions without a browser: preflight rows, caption sidecars
written atomically (and only those), bulk edits, and auto-captioning as a queued job."""

from __future__ import annotations

import time

import pytest

from sdlora.errors import SdloraError
from sdlora.studio import dataset_ops, jobs, runs, tab_watch
from sdlora.studio.jobs import JobQueue


def test_rows_show_every_file_with_its_sidecar_caption(style_dir):
    (style_dir / "broken.png").write_bytes(b"not a png")
    result = dataset_ops.preflight(style_dir, "zkstripes", 64, ".txt")
    by_name = {row[1]: row for row in result.rows}
    assert by_name["broken.png"][4] == "skipped"
    assert by_name["00_white_circle.png"][5] == "a white circle"  # the file's text, no trigger
    assert by_name["00_white_circle.png"][0].startswith("![](data:image/jpeg;base64,")
    assert [s["file"] for s in result.report["skipped"]] == ["broken.png"]


def test_a_caption_is_written_atomically_beside_its_image_and_nowhere_else(style_dir, tmp_path):
    before = {p.name for p in style_dir.iterdir()}
    path = dataset_ops.write_caption(style_dir, "01_white_square.png", " zk, a square \n", ".txt")
    assert path == style_dir / "01_white_square.txt"
    assert path.read_text(encoding="utf-8") == "zk, a square\n"
    assert {p.name for p in style_dir.iterdir()} == before  # replaced, no temp file left
    with pytest.raises(SdloraError, match="is not an image in"):
        dataset_ops.write_caption(style_dir, "../outside.png", "x", ".txt")
    (style_dir / "new.png").write_bytes((style_dir / "00_white_circle.png").read_bytes())
    assert dataset_ops.write_caption(style_dir, "new.png", "zk", ".txt").name == "new.txt"


def test_only_changed_captions_are_written(style_dir):
    rows = dataset_ops.preflight(style_dir, "zk", 64, ".txt").rows
    edits = {row[1]: row[5] for row in rows}
    edits["02_white_triangle.png"] = "zk, a new triangle"
    written = dataset_ops.save_captions(style_dir, edits, ".txt")
    assert [p.name for p in written] == ["02_white_triangle.txt"]


def test_bulk_edits():
    captions = {"a.png": "a cat, red", "b.png": "zk, a dog"}
    assert dataset_ops.bulk_edit(captions, "prefix", "zk") == {
        "a.png": "zk, a cat, red",
        "b.png": "zk, a dog",
    }
    assert dataset_ops.bulk_edit(captions, "suffix", "flat colours")["a.png"] == (
        "a cat, red, flat colours"
    )
    assert dataset_ops.bulk_edit(captions, "find/replace", "red", "blue")["a.png"] == "a cat, blue"
    assert dataset_ops.bulk_edit(captions, "set trigger", "zk")["b.png"] == "zk, a dog"
    with pytest.raises(SdloraError, match="needs a text"):
        dataset_ops.bulk_edit(captions, "prefix", " ")


def test_tag_counts_most_frequent_first():
    assert dataset_ops.tag_counts(["zk, a cat", "ZK, a dog", "zk"]) == [
        ("zk", 3),
        ("a cat", 1),
        ("a dog", 1),
    ]


def test_auto_caption_runs_as_a_job_and_writes_only_captions(style_dir, tmp_path):
    for sidecar in style_dir.glob("0[0-2]_*.txt"):
        sidecar.unlink()
    queue = JobQueue(tmp_path / "ws")
    job = runs.submit_caption(queue, str(style_dir), "zkstripes", "{trigger}, {name}")
    queue.tick()
    deadline = time.time() + 120
    while queue.get(job.id).status not in jobs.FINAL and time.time() < deadline:
        time.sleep(0.2)
    done = queue.get(job.id)
    assert done.status == jobs.DONE, done.error
    assert (style_dir / "00_white_circle.txt").read_text() == "zkstripes, 00 white circle\n"
    assert sorted(p.suffix for p in style_dir.iterdir()) == [".png"] * 6 + [".txt"] * 6
    stdout = (queue.folder(job.id) / "stdout.log").read_text()
    assert "3 caption(s) written, kept 3 existing" in stdout
    assert tab_watch.caption_count(queue.folder(job.id) / "stdout.log") == 3  # its progress
