"""The training images: folder scan, captions with the trigger word, decoding and resizing.

The user's folder is only ever read. A file that cannot be used is skipped and reported by
name; it never stops the scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdlora.errors import SdloraError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IGNORED_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}


@dataclass(frozen=True)
class Example:
    """One training image and its final caption (trigger word included)."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str


@dataclass
class Scan:
    """What a folder holds: usable examples, skipped files and warnings, each with a reason."""

    root: Path
    examples: list[Example] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def scan_folder(
    root: str | Path,
    trigger: str,
    caption_ext: str = ".txt",
    caption_template: str = "{trigger}",
) -> Scan:
    """Find the images under `root` (sorted, sub-folders included) and caption each."""
    root = Path(root)
    if not root.is_dir():
        raise SdloraError(f"dataset folder {root} does not exist; set dataset.path to your images")
    scan = Scan(root=root)
    for path in _image_files(root):
        try:
            with Image.open(path) as img:
                img.load()  # full decode: catches truncated files that verify() misses
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unusable file"
            scan.skipped.append(Problem(path, f"unreadable image ({e.__class__.__name__}: {e})"))
            continue
        caption = read_caption(path, caption_ext, scan)
        if caption is None:
            caption = caption_template.format(trigger=trigger)
        scan.examples.append(Example(path, caption_with_trigger(caption, trigger)))
    if not scan.examples:
        detail = f" ({len(scan.skipped)} unreadable)" if scan.skipped else ""
        raise SdloraError(
            f"dataset folder {root} has no usable images{detail}; add .jpg/.png/.webp/.bmp files"
        )
    return scan


def _image_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in IGNORED_NAMES for p in parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
    return files


def read_caption(image: Path, caption_ext: str, scan: Scan) -> str | None:
    """The caption beside `image` (UTF-8, BOM stripped, lines joined with ', '), or None."""
    sidecar = image.with_suffix(caption_ext)
    if not sidecar.is_file():
        return None
    try:
        text = sidecar.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        scan.warnings.append(Problem(sidecar, "caption is not UTF-8; the fallback caption is used"))
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return ", ".join(lines) if lines else None


def caption_with_trigger(caption: str, trigger: str) -> str:
    """Put `trigger` first unless the caption already contains it as a tag or word."""
    caption = caption.strip()
    tags = [t.strip().lower() for t in caption.split(",")]
    words = caption.lower().replace(",", " ").split()
    if trigger.lower() in tags or trigger.lower() in words:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def tag_frequency(scan: Scan) -> dict[str, dict[str, int]]:
    """`{folder_name: {tag: count}}` over the captions, as sd-scripts records it."""
    counts: dict[str, int] = {}
    for example in scan.examples:
        for tag in example.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {scan.root.name: counts}


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode `path` to RGB, resize the short side to `resolution`, centre-crop a square.

    EXIF rotation is applied and transparency is composited on white. Returns a float tensor
    (3, resolution, resolution) in [-1, 1].
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        img = img.convert("RGB")
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
