"""The training images: folder scan, preflight (full decode of every file), captions, buckets.

The user's folder is only ever read. A file that cannot be used is skipped and reported by
name with a reason; it never stops the scan. Everything here runs before any model loads.

Scan rules: image extensions are matched case-insensitively (`.JPG` counts once, as `.jpg`);
dotfiles, `__MACOSX`, `Thumbs.db`, `desktop.ini` and non-image files are ignored; image formats
that are not read (`.psd`, `.heic`, ...) are skipped by name; only regular files are opened
(a named pipe would block the scan forever); the order is sorted by path. Symbolic links are
followed inside the folder, each real folder once (loops end); links that lead outside it are
skipped unless `follow_external_links`, and never followed into /proc, /sys or /dev. A
sub-folder named `N_name` (sd-scripts' convention, e.g. `10_forest`) repeats its images N
times per epoch. Animated GIF/WebP: the first frame is used, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.buckets import (
    batches_per_epoch,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
    upscale_factor,
)
from sdlora.captions import (
    CLIP_MAX_TOKENS,
    CaptionProblem,
    caption_with_trigger,
    clip_token_count,
    has_trigger,
    read_caption_file,
    split_tags,
    template_caption,
)
from sdlora.decode import (
    DEFAULT_MAX_PIXELS,
    EXTENSION_FORMATS,
    UNSUPPORTED_EXTENSIONS,
    UNSUPPORTED_REASON,
    ImageProblem,
    not_regular,
    open_rgb,
    read_regular,
)
from sdlora.errors import SdloraError
from sdlora.masks import is_mask, mask_for

IMAGE_EXTENSIONS = tuple(EXTENSION_FORMATS)
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MIN_IMAGES = 5
EPOCH_TARGET = 100
"""Automatic repeats aim for about this many images per epoch (5 images: 20 repeats each)."""
SMALL_FACTOR = 2.0
"""An image enlarged more than this to fill its bucket is "too small" (< half the resolution)."""
PREFLIGHT_WORKERS = 4
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
"""Never followed into, whatever the settings: their files are endless, blocking or live."""
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


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


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str


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
                    f"{printable(_rel(p.path, self.root))}: {printable(p.reason)}"
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
            scan.skipped.append(Problem(path, f"duplicate of {_rel(seen[item.sha256], root)}"))
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


def walk_images(
    root: Path, problems: list[Problem] | None = None, follow_external_links: bool = False
) -> tuple[list[tuple[Path, int]], dict[Path, dict[str, str]]]:
    """(image path, folder repeats) in sorted order, and each folder's {lowercase name: name}.

    Folders that cannot be listed, links not followed, image files that are not regular files
    and image formats that are not read are added to `problems`.
    """
    files: list[tuple[Path, int]] = []
    listings: dict[Path, dict[str, str]] = {}
    visited: set[tuple[int, int]] = set()
    real_root = Path(os.path.realpath(root))

    def skip(path: Path, reason: str) -> None:
        if problems is not None:
            problems.append(Problem(path, reason))

    def unreadable(error: OSError) -> None:
        skip(Path(error.filename), f"unreadable folder: {error.strerror}")

    for folder, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        folder_path = Path(folder)
        st = folder_path.stat()
        if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a second link to a folder
            dirnames.clear()
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = [
            d
            for d in sorted(dirnames)
            if not _ignored(d)
            and not _refused_link(folder_path / d, real_root, follow_external_links, skip)
        ]
        names = sorted(n for n in filenames if not _ignored(n))
        listings[folder_path] = {n.lower(): n for n in names}
        repeats = _folder_repeats(folder_path.relative_to(root))
        for name in names:
            path, suffix = folder_path / name, Path(name).suffix.lower()
            if suffix in UNSUPPORTED_EXTENSIONS:
                skip(path, f"{UNSUPPORTED_REASON} ({suffix} is not read)")
            elif suffix in IMAGE_EXTENSIONS and not is_mask(path):
                if _refused_link(path, real_root, follow_external_links, skip):
                    continue
                reason = _not_regular(path)
                if reason:
                    skip(path, reason)
                else:
                    files.append((path, repeats))
    return files, listings


def link_problem(path: Path, real_root: Path, follow_external_links: bool) -> str | None:
    """Why the symbolic link `path` is not followed, or None (not a link, or allowed).

    Links inside the dataset folder are followed; those leading out of it only when allowed,
    and never into /proc, /sys or /dev.
    """
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    if target.is_relative_to(real_root):
        return None
    shown = printable(str(target))
    for system in SYSTEM_FOLDERS:
        if target.is_relative_to(system):
            return f"link into {system} ({shown}): system folders are never read"
    if follow_external_links:
        return None
    return (
        f"link leads outside the dataset folder (to {shown}); "
        "set dataset.follow_external_links=true to use it"
    )


def _refused_link(path: Path, real_root: Path, follow: bool, skip) -> bool:
    reason = link_problem(path, real_root, follow)
    if reason:
        skip(path, reason)
    return reason is not None


def _not_regular(path: Path) -> str | None:
    """The reason `path` (a FIFO, socket, device) is not opened; None for a regular file or
    one whose stat fails (reading it then gives the reason: a broken link, a link loop)."""
    try:
        return not_regular(path.stat().st_mode)
    except OSError:
        return None


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _folder_repeats(relative: Path) -> int:
    """Repeats from the nearest `N_name` folder of `relative`; 0 when none says."""
    for part in reversed(relative.parts):
        match = REPEAT_FOLDER.match(part)
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return 0


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


def find_sidecar(image: Path, listing: dict[str, str], caption_ext: str) -> Path | None:
    """The caption file of `image`: `a.png.txt` first, then `a.txt` (extension case ignored)."""
    for name in (image.name + caption_ext, image.stem + caption_ext):
        actual = listing.get(name.lower())
        if actual is not None:
            return image.parent / actual
    return None


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
    refused = refused or _not_regular(sidecar)
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


def steps_per_epoch(scan: Scan, batch_size: int, grad_accum: int = 1, processes: int = 1) -> int:
    """Optimizer steps in one epoch (batches never mix buckets, so some are short); each step
    takes `grad_accum` batches in each of `processes` processes."""
    buckets = [e.bucket for e in scan.examples]
    batches = batches_per_epoch(buckets, [e.repeats for e in scan.examples], batch_size)
    return max(1, math.ceil(batches / (grad_accum * processes)))


def epoch_plan(
    scan: Scan, steps: int, batch_size: int, grad_accum: int = 1, processes: int = 1
) -> str:
    """One line: images, repeats, images per epoch, steps and the epochs they make; then the
    `batch_warning`, if any, after `; `."""
    per_epoch = sum(e.repeats for e in scan.examples)
    repeats = sorted({e.repeats for e in scan.examples})
    shown = str(repeats[0]) if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]}"
    epoch_steps = steps_per_epoch(scan, batch_size, grad_accum, processes)
    plan = (
        f"{len(scan.examples)} images x {shown} repeats = {per_epoch} per epoch "
        f"({epoch_steps} steps of batch {batch_size * grad_accum * processes}); "
        f"{steps} steps = {steps / epoch_steps:.1f} epochs"
    )
    warning = batch_warning(scan, batch_size, grad_accum)
    return f"{plan}; {warning}" if warning else plan


def batch_warning(scan: Scan, batch_size: int, grad_accum: int = 1) -> str | None:
    """The warning when no bucket holds `batch_size` images per epoch, so every batch is short
    (a batch never mixes buckets or epochs); None when some batch can be full."""
    per_bucket = Counter()
    for e in scan.examples:
        per_bucket[e.bucket] += e.repeats
    largest = max(per_bucket.values(), default=0)
    if not largest or largest >= batch_size:
        return None
    where = "an epoch holds" if len(per_bucket) == 1 else "the fullest bucket holds"
    accum = f" x grad_accum {grad_accum} = {largest * grad_accum}" if grad_accum > 1 else ""
    return (
        f"warning: train.batch_size={batch_size} but {where} only {largest} images, so the "
        f"effective batch size is {largest}{accum}; lower train.batch_size or raise "
        "dataset.repeats"
    )


def summarise_problems(scan: Scan, limit: int = 3) -> list[str]:
    """Report lines: every skipped file; warnings with the same reason grouped past `limit`."""
    lines = [
        f"skipped {printable(_rel(p.path, scan.root))}: {printable(p.reason)}" for p in scan.skipped
    ]
    groups: dict[str, list[Path]] = {}
    for p in scan.warnings:
        groups.setdefault(printable(p.reason), []).append(p.path)
    for reason, paths in groups.items():
        names = [printable(_rel(path, scan.root)) for path in paths]
        if len(names) > limit:
            shown = ", ".join(names[:limit])
            lines.append(f"warning: {reason} ({len(names)} files: {shown}, ...)")
        else:
            lines += [f"warning {name}: {reason}" for name in names]
    return lines


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


def tag_frequency(scan: Scan) -> dict[str, dict[str, int]]:
    """`{folder_name: {tag: count}}` over the captions, as sd-scripts records it."""
    counts: dict[str, dict[str, int]] = {}
    for example in scan.examples:
        folder = example.path.parent
        name = scan.root.name if folder == scan.root else _rel(folder, scan.root)
        tags = counts.setdefault(name, {})
        for tag in split_tags(example.caption.lower()):
            tags[tag] = tags.get(tag, 0) + 1
    return counts


def folder_counts(scan: Scan) -> dict[str, dict[str, int]]:
    """`{folder: {"n_repeats": r, "img_count": n}}` (sd-scripts' `ss_dataset_dirs`)."""
    dirs: dict[str, dict[str, int]] = {}
    for example in scan.examples:
        folder = example.path.parent
        name = scan.root.name if folder == scan.root else _rel(folder, scan.root)
        entry = dirs.setdefault(name, {"n_repeats": example.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def printable(text: str) -> str:
    """`text` safe to print on one line: control characters, bidi overrides and bytes that are
    not UTF-8 (a file name's) escaped as `\\n`, `\\u202e`, `\\xff`; other characters kept."""
    out = []
    for c in text:
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c in BIDI_CONTROLS or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
            out.append(c.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(c)
    return "".join(out)
