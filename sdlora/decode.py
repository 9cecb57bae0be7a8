"""Decoding a user's image file into 8-bit RGB, whatever mode, depth or orientation it has.

Every training image goes through `open_rgb`: EXIF orientation applied (so the size seen by the
buckets is the size trained on), the first frame of an animation, colours converted to sRGB
through an embedded ICC profile, transparency composited on a background colour (the hidden
colour under transparent pixels is never trained on), palette, grey, CMYK and 16-bit images
converted (16-bit values are scaled, never clipped to white), and our own pixel cap checked
before the pixels are decoded.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, never train on a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000
"""About 10000 x 10000: far above any training image, far below what exhausts memory."""

# Pillow's format names for the allowlisted extensions.
FORMATS = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "BMP": "BMP",
    "GIF": "GIF",
    "MPO": "JPEG",
    "TIFF": "TIFF",
}
EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WebP",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
UNSUPPORTED_EXTENSIONS = frozenset(
    # Image formats people keep beside their training images that are not read: named in the
    # report rather than silently ignored. Editors' layered files, camera raw, HDR, and newer
    # codecs whose Pillow support depends on how Pillow was built.
    ".psd .psb .xcf .kra .ora .clip .afphoto .ai .eps .svg .pdf "
    ".fits .fit .fts .exr .hdr .pfm .dds .tga .ico .icns .pcx .ppm .pgm .pbm .pnm "
    ".avif .heic .heif .jxl .jp2 .j2k .jpf .jpx .jxr .wdp "
    ".dng .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .orf .rw2 .raf .pef .srw .x3f .raw".split()
)
UNSUPPORTED_REASON = "format not supported: convert to PNG or JPEG"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


class ImageProblem(Exception):
    """A file that cannot be trained on; `reason` is worded for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Decoded:
    """An image ready to crop: RGB pixels plus what was done to get them (for the report)."""

    image: Image.Image
    format: str
    notes: list[str] = field(default_factory=list)
    """Warnings for the report: animated, 16-bit, transparency, format/extension mismatch."""


def parse_colour(text: str) -> tuple[int, int, int]:
    """`white`, `#808080` or `rgb(0,0,0)` as an RGB triple; ValueError names the bad text."""
    try:
        colour = ImageColor.getrgb(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a colour (use a name such as white or #rrggbb)"
        ) from None
    return colour[:3]


def not_regular(mode: int) -> str | None:
    """The skip reason for a file of `mode` (from stat) that is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"not a regular file: {kind}; only regular files are read"


def read_regular(path: Path) -> bytes:
    """The bytes of `path`, refusing anything but a regular file before reading from it.

    Opened without blocking, so a named pipe with no writer cannot stall the scan, and checked
    on the open descriptor, so a file swapped for a pipe after the scan's listing is caught too.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        reason = not_regular(os.fstat(fd).st_mode)
        if reason:
            raise ImageProblem(reason)
        return file.read()


def open_rgb(
    path: Path,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> Decoded:
    """Fully decode `path` (or `data`, its bytes already read) into 8-bit RGB; raises
    ImageProblem with a reason otherwise, OSError when the file cannot be read."""
    if data is None:
        data = read_regular(path)
    if not data:
        raise ImageProblem("unreadable: empty (0-byte) file")
    if Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses at twice its limit; ours governs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # over Pillow's own, higher limit
            declared = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(declared.group(1)) if declared else None
            raise ImageProblem(_too_many_pixels(path, pixels, max_pixels)) from None
        except UnidentifiedImageError:
            raise ImageProblem("unreadable: not an image Pillow can decode") from None
        except OSError as e:
            raise ImageProblem(f"unreadable: {e}") from None
    with img:
        if img.width * img.height > max_pixels:
            raise ImageProblem(_too_many_pixels(path, img.width * img.height, max_pixels))
        notes = []
        fmt = FORMATS.get(img.format or "", img.format or "unknown")
        expected = EXTENSION_FORMATS.get(path.suffix.lower())
        if expected and expected != fmt:
            notes.append(f"a {fmt} file named {path.suffix}; decoded as {fmt}")
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            notes.append(f"animated ({frames} frames); the first frame is used")
        sixteen_bit = _is_sixteen_bit(img)  # read before load(), which clears img.tile
        if sixteen_bit:
            notes.append("16-bit image; scaled to 8 bits")
        try:
            img.load()  # the full decode: verify() passes truncated JPEGs
            upright = _to_srgb(ImageOps.exif_transpose(img), notes)
            rgb = _to_rgb(upright, background, sixteen_bit, notes)
        except OSError as e:
            if "truncated" in str(e) or "broken" in str(e):
                raise ImageProblem(f"truncated: {e}") from None
            raise ImageProblem(f"unreadable: {e}") from None
        except (SyntaxError, ValueError, EOFError) as e:  # Pillow's corrupt-data errors
            raise ImageProblem(f"unreadable: {e.__class__.__name__}: {e}") from None
    return Decoded(rgb, fmt, notes)


def _too_many_pixels(path: Path, pixels: int | None, max_pixels: int) -> str:
    declared = f"{pixels:,} pixels" if pixels else "more pixels"
    return (
        f"too large: {path.name} declares {declared}, over the cap of {max_pixels:,} "
        "(possible decompression bomb; raise dataset.max_pixels if the image is genuine)"
    )


def _is_sixteen_bit(img: Image.Image) -> bool:
    if img.mode in SIXTEEN_BIT_MODES:
        return True
    args = img.tile[0].args if img.tile else None
    rawmode = args[0] if isinstance(args, tuple) and args else args  # TIFF: (rawmode, ...)
    return isinstance(rawmode, str) and ";16" in rawmode


def _to_srgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert colours through an embedded ICC profile (Display P3, Adobe RGB, CMYK) to sRGB.

    Models see sRGB; ignoring a wide-gamut profile would train on dulled colours.
    """
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = "RGBA" if img.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(img, source, SRGB, outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        notes.append("colour profile unreadable or unusable; ignored")
        return img


def _to_rgb(
    img: Image.Image, background: tuple[int, int, int], sixteen_bit: bool, notes: list[str]
) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels land on `background`."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        img = Image.fromarray(_scale_to_8_bit(np.asarray(img), sixteen_bit))  # mode L
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("has transparency; composited on the background colour")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def _scale_to_8_bit(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16-bit (or 32-bit int/float) grey to 0..255 by scaling the format's range, not clipping."""
    if array.dtype.kind == "f":
        top = 1.0 if array.max(initial=0) <= 1.0 else float(array.max())
    elif sixteen_bit or array.max(initial=0) > 255:
        top = 65535.0
    else:
        top = 255.0
    return np.clip(array.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
