"""The training images: preflight (full decode of every file), captions, buckets, pixels.

The user's folder is only ever read (`sdlora.folders` walks it). A file that cannot be used is
skipped and reported by name with a reason; it never stops the scan. Everything here runs
before any model loads. Animated GIF/WebP: the first frame is used, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.buckets import fit_to_bucket, make_buckets, nearest_bucket, upscale_factor
from sdlora.captions import (
    CLIP_MAX_TOKENS,
    CaptionProblem,
    caption_with_trigger,
    clip_token_count,
    has_trigger,
    read_caption_file,
    template_caption,
)
from sdlora.decode import DEFAULT_MAX_PIXELS, ImageProblem, open_rgb, read_regular
from sdlora.errors import SdloraError
from sdlora.folders import (
    IMAGE_EXTENSIONS,
    Problem,
    find_sidecar,
    link_problem,
    not_regular_file,
    printable,
    relative_name,
    walk_images,
)
from sdlora.masks import mask_for

MIN_IMAGES = 5
EPOCH_TARGET = 100
"""Automatic repeats aim for about this many images per epoch (5 images: 20 repeats each)."""
SMALL_FACTOR = 2.0
"""An image enlarged more than this to fill its bucket is "too small" (< half the resolution)."""
PREFLIGHT_WORKERS = 4


@dataclass(frozen=True)
class Example:
    """One usable training image: its final caption, size after EXIF rotation, bucket."""

    path: Path
    caption: str
    size: tuple[int, int]
    bucket: tuple[int, int]
    repeats: int
    sha256: str
    """Hash of the file's bytes: the latent cache key and the duplicate check."""
    mask: Path | None = None
    """Its loss mask (`name.mask.png` beside it), if any: see `sdlora.masks`."""


@dataclass
class Scan:
    """What a folder holds: usable examples, skipped files and warnings, each with a reason."""

    root: Path
    resolution: int
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_external_links: bool = False
    examples: list[Example] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def require_examples(self) -> None:
        """Raise the user-facing error when nothing in the folder can be trained on."""
        if not self.examples:
            detail = ""
            if self.skipped:
                first = "; ".join(
                    f"{printable(relative_name(p.path, self.root))}: {printable(p.reason)}"
                    for p in self.skipped[:2]
                )
                more = ", ..." if len(self.skipped) > 2 else ""
                detail = f" ({len(self.skipped)} skipped: {first}{more}; `sdlora check` lists all)"
            raise SdloraError(
                f"dataset folder {printable(str(self.root))} has no usable images{detail}; "
                f"add {'/'.join(IMAGE_EXTENSIONS)} files"
            )

    def bucket_counts(self) -> dict[str, int]:
        counts = Counter(f"{w}x{h}" for w, h in (e.bucket for e in self.examples))
        return dict(sorted(counts.items()))


@dataclass
class _Inspected:
    path: Path
    repeats: int
    size: tuple[int, int] | None = None
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    problem: str | None = None


def scan_folder(
    root: str | Path,
    trigger: str,
    resolution: int = 512,
    caption_ext: str = ".txt",
    caption_template: str = "{trigger}",
    repeats: int = 0,
    buckets: bool = True,
    small_images: str = "skip",
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    follow_external_links: bool = False,
) -> Scan:
    """Find, fully decode and caption every image under `root` (preflight; reads only).

    `repeats`: times per epoch for images outside `N_name` folders; 0 chooses it from the image
    count (`auto_repeats`). `small_images`: `skip` or `upscale` images that would be enlarged
    more than 2x to fill their bucket. `follow_external_links`: use symbolic links that lead
    outside `root` (never into /proc, /sys, /dev).
    """
    root = Path(root)
    if not root.is_dir():
        raise SdloraError(f"dataset folder {root} does not exist; set dataset.path to your images")
    try:
        template_caption(caption_template, trigger)
    except ValueError as e:
        raise SdloraError(f"dataset.caption_template: {e}") from None
    scan = Scan(root, resolution, background, max_pixels, follow_external_links)
    files, listings = walk_images(root, scan.skipped, follow_external_links)
    with ThreadPoolExecutor(PREFLIGHT_WORKERS) as pool:  # decoders release the GIL
        inspected = list(pool.map(lambda f: _inspect(*f, background, max_pixels), files))
    bucket_list = make_buckets(resolution, buckets)
    seen: dict[str, Path] = {}
    sidecar_users: dict[Path, Path] = {}
    captioned = 0
    for item in inspected:
        path = item.path
        if item.problem:
            scan.skipped.append(Problem(path, item.problem))
            continue
        if item.sha256 in seen:
            scan.skipped.append(
                Problem(path, f"duplicate of {relative_name(seen[item.sha256], root)}")
            )
            continue
        seen[item.sha256] = path
        bucket = nearest_bucket(item.size, bucket_list)
        factor = upscale_factor(item.size, bucket)
        if factor > SMALL_FACTOR:
            size = f"{item.size[0]}x{item.size[1]}"
            if small_images == "skip":
                scan.skipped.append(
                    Problem(
                        path,
                        f"too small: {size} is under half the training resolution "
                        f"(needs {factor:.1f}x to fill {bucket[0]}x{bucket[1]}); "
                        "set dataset.small_images=upscale to use it",
                    )
                )
                continue
            item.notes.append(f"small: {size} upscaled {factor:.1f}x (blurs the style)")
        for note in item.notes:
            scan.warnings.append(Problem(path, note))
        caption = _caption(path, listings[path.parent], caption_ext, trigger, scan, sidecar_users)
        if caption is None:
            caption = template_caption(caption_template, trigger, name=path.stem)
            scan.warnings.append(Problem(path, f"no caption; using {caption!r}"))
        else:
            captioned += 1
        final = caption_with_trigger(caption, trigger)
        tokens = clip_token_count(final)
        if tokens > CLIP_MAX_TOKENS:
            scan.warnings.append(
                Problem(
                    path,
                    f"caption too long: at least {tokens} CLIP tokens; the text encoder "
                    f"ignores all past {CLIP_MAX_TOKENS}",
                )
            )
        scan.examples.append(
            Example(path, final, item.size, bucket, item.repeats, item.sha256, mask_for(path))
        )
    _default_repeats(scan, repeats)
    if not captioned and scan.examples:
        _warn_other_caption_extensions(scan, listings, caption_ext)
    if 0 < len(scan.examples) < MIN_IMAGES:
        scan.warnings.append(
            Problem(
                root,
                f"only {len(scan.examples)} usable images; {MIN_IMAGES}-100 images of one style "
                "train a more general LoRA",
            )
        )
    return scan


def _inspect(path: Path, repeats: int, background, max_pixels: int) -> _Inspected:
    item = _Inspected(path, repeats)
    try:
        data = read_regular(path)
        decoded = open_rgb(path, background, max_pixels, data)
    except ImageProblem as e:
        item.problem = e.reason
        return item
    except OSError as e:  # a broken link, a permission error
        item.problem = f"unreadable: {e.strerror or e}"
        return item
    item.size, item.notes = decoded.image.size, decoded.notes
    item.sha256 = hashlib.sha256(data).hexdigest()
    return item


def _caption(path, listing, caption_ext, trigger, scan, sidecar_users) -> str | None:
    """The sidecar caption of `path`, or None (reasons go to the scan's warnings)."""
    sidecar = find_sidecar(path, listing, caption_ext)
    if sidecar is None:
        return None
    if sidecar in sidecar_users:
        other = sidecar_users[sidecar].name
        scan.warnings.append(Problem(path, f"shares the caption {sidecar.name} with {other}"))
    sidecar_users.setdefault(sidecar, path)
    real_root = Path(os.path.realpath(scan.root))
    refused = link_problem(sidecar, real_root, scan.follow_external_links)
    refused = refused or not_regular_file(sidecar)
    if refused:
        scan.warnings.append(Problem(sidecar, f"caption not read: {refused}"))
        return None
    try:
        caption = read_caption_file(sidecar)
    except CaptionProblem as e:
        scan.warnings.append(Problem(sidecar, e.reason))
        return None
    except OSError as e:
        scan.warnings.append(Problem(sidecar, f"caption unreadable: {e.strerror or e}"))
        return None
    if not caption:
        scan.warnings.append(Problem(sidecar, "caption file is empty"))
        return None
    if trigger and not has_trigger(caption, trigger):
        scan.warnings.append(Problem(path, "caption lacks the trigger word; it is put first"))
    return caption


def _warn_other_caption_extensions(scan: Scan, listings, caption_ext: str) -> None:
    """The loud warning when no sidecar matched but same-named files with another end exist."""
    stems = {(e.path.parent, e.path.stem.lower()) for e in scan.examples}
    others = Counter()
    for folder, listing in listings.items():
        for name in listing.values():
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS or suffix == caption_ext.lower():
                continue
            if (folder, Path(name).stem.lower()) in stems:
                others[suffix or name] += 1
    if others:
        ext, count = others.most_common(1)[0]
        scan.warnings.insert(
            0,
            Problem(
                scan.root,
                f"NO CAPTIONS USED: no file ends in {caption_ext}, but {count} files named like "
                f"the images end in {ext}; if they are captions, set dataset.caption_ext={ext}",
            ),
        )


def auto_repeats(image_count: int) -> int:
    """Repeats for a folder of `image_count` images: about EPOCH_TARGET images per epoch."""
    return max(1, round(EPOCH_TARGET / max(1, image_count)))


def _default_repeats(scan: Scan, repeats: int) -> None:
    """Give images outside `N_name` folders `repeats`, or the automatic value when it is 0."""
    unset = sum(1 for e in scan.examples if e.repeats == 0)
    value = repeats or auto_repeats(unset)
    scan.examples = [
        e if e.repeats else dataclasses.replace(e, repeats=value) for e in scan.examples
    ]


def load_pixels(
    scan: Scan,
    example: Example,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixels (3, H, W) in [-1, 1] at the example's bucket, and the crop's (top, left)."""
    try:
        decoded = open_rgb(example.path, scan.background, scan.max_pixels)
    except ImageProblem as e:
        raise SdloraError(f"{example.path} changed during training: {e.reason}") from None
    return fit_to_bucket(decoded.image, example.bucket, crop, rng, flip)
