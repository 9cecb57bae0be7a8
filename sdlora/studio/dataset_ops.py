"""What the studio's Dataset screen does to a folder: the preflight as table rows (the scan and
report `sdlora check` uses), caption sidecars read and written atomically, bulk caption edits,
and tag counts. Only caption files are ever written into the dataset folder."""

from __future__ import annotations

import base64
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdlora.captions import CaptionProblem, caption_with_trigger, read_caption_file, split_tags
from sdlora.dataset import Scan, scan_folder
from sdlora.errors import SdloraError
from sdlora.export import write_atomic
from sdlora.folders import find_sidecar
from sdlora.preflight import report

THUMB = 64  # thumbnail side in the table, pixels
BULK_OPS = ("prefix", "suffix", "find/replace", "set trigger")


@dataclass
class Preflight:
    scan: Scan
    report: dict
    rows: list[list[str]]
    """thumbnail (markdown image), file, size, bucket, status, caption (the sidecar's text);
    the reasons of skipped files and warnings are in `report`."""


def preflight(folder: str | Path, trigger: str, resolution: int, caption_ext: str) -> Preflight:
    """Scan `folder` as `sdlora check` does; one row per file, skipped ones with their reasons."""
    scan = scan_folder(folder, trigger, resolution, caption_ext=caption_ext)
    data = report(scan)
    rows = []
    for entry in data["files"]:
        path = scan.root / entry["file"]
        ok = entry["status"] != "skipped"
        size = "x".join(str(v) for v in entry.get("size", ())) or "-"
        caption = read_caption(scan.root, entry["file"], caption_ext) if ok else ""
        rows.append(
            [thumbnail(path) if ok else "", entry["file"], size, entry.get("bucket", "-")]
            + [entry["status"], caption]
        )
    return Preflight(scan, data, rows)


def thumbnail(path: Path) -> str:
    """A small inline JPEG of `path` as a markdown image (works offline, serves no files)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=80)
    except (OSError, ValueError):
        return ""
    return f"![]({'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode()})"


def sidecar_path(root: Path, relname: str, caption_ext: str) -> Path:
    """The caption file of image `relname` under `root`: the existing sidecar the scan reads,
    or `<stem><caption_ext>` for a new one. Refuses names outside `root`."""
    image = (root / relname).resolve()
    if not image.is_relative_to(root.resolve()) or not image.is_file():
        raise SdloraError(f"{relname} is not an image in {root}")
    listing = {name.lower(): name for name in os.listdir(image.parent)}
    return find_sidecar(image, listing, caption_ext) or image.with_name(image.stem + caption_ext)


def read_caption(root: Path, relname: str, caption_ext: str) -> str:
    path = sidecar_path(root, relname, caption_ext)
    try:
        return read_caption_file(path) if path.is_file() else ""
    except CaptionProblem:
        return ""


def write_caption(root: Path, relname: str, text: str, caption_ext: str) -> Path:
    """Write one caption atomically (a temporary file renamed over the sidecar)."""
    path = sidecar_path(Path(root), relname, caption_ext)
    write_atomic(path, (text.strip() + "\n").encode("utf-8"))
    return path


def save_captions(root: Path, edits: dict[str, str], caption_ext: str) -> list[Path]:
    """Write the captions that differ from what is on disk; returns the files written."""
    written = []
    for relname, text in edits.items():
        if text.strip() != read_caption(Path(root), relname, caption_ext):
            written.append(write_caption(Path(root), relname, text, caption_ext))
    return written


def bulk_edit(captions: dict[str, str], op: str, a: str, b: str = "") -> dict[str, str]:
    """Captions after one bulk edit: `prefix`/`suffix` add tag `a`; `find/replace` swaps `a`
    for `b`; `set trigger` puts `a` first (as training would)."""
    a = a.strip()
    if op not in BULK_OPS:
        raise SdloraError(f"unknown bulk edit {op!r}; choose one of {', '.join(BULK_OPS)}")
    if not a:
        raise SdloraError(f"{op} needs a text to apply")
    out = {}
    for name, text in captions.items():
        tags = split_tags(text)
        if op == "prefix":
            tags = [a, *tags] if a not in tags else tags
        elif op == "suffix":
            tags = [*tags, a] if a not in tags else tags
        elif op == "find/replace":
            tags = split_tags(text.replace(a, b))
        else:
            tags = split_tags(caption_with_trigger(text, a))
        out[name] = ", ".join(tags)
    return out


def tag_counts(captions: list[str]) -> list[tuple[str, int]]:
    """(tag, count) over the captions, most frequent first."""
    counts = Counter(tag.lower() for caption in captions for tag in split_tags(caption))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
