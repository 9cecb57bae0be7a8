"""Walking a dataset folder: which files are images, which links are followed, repeat folders.

The user's folder is only ever read. Scan rules: image extensions are matched case-insensitively
(`.JPG` counts once, as `.jpg`); dotfiles, `__MACOSX`, `Thumbs.db`, `desktop.ini` and non-image
files are ignored; image formats that are not read (`.psd`, `.heic`, ...) are skipped by name;
only regular files are opened (a named pipe would block the scan forever); the order is sorted
by path. Symbolic links are followed inside the folder, each real folder once (loops end); links
that lead outside it are skipped unless `follow_external_links`, and never followed into /proc,
/sys or /dev. A sub-folder named `N_name` (sd-scripts' convention, e.g. `10_forest`) repeats its
images N times per epoch. Caption sidecars are found here too; names are made `printable`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from sdlora.decode import EXTENSION_FORMATS, UNSUPPORTED_EXTENSIONS, UNSUPPORTED_REASON, not_regular
from sdlora.masks import is_mask

IMAGE_EXTENSIONS = tuple(EXTENSION_FORMATS)
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
"""Never followed into, whatever the settings: their files are endless, blocking or live."""
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


@dataclass(frozen=True)
class Problem:
    """A file or folder skipped or warned about, and why."""

    path: Path
    reason: str


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
                reason = not_regular_file(path)
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


def not_regular_file(path: Path) -> str | None:
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


def find_sidecar(image: Path, listing: dict[str, str], caption_ext: str) -> Path | None:
    """The caption file of `image`: `a.png.txt` first, then `a.txt` (extension case ignored)."""
    for name in (image.name + caption_ext, image.stem + caption_ext):
        actual = listing.get(name.lower())
        if actual is not None:
            return image.parent / actual
    return None


def relative_name(path: Path, root: Path) -> str:
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
