"""A messy dataset folder made on the spot: every way a user's folder goes wrong, with answers.

`make_messy(folder)` writes the files and returns what the scan must say about each one.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

RED = (220, 30, 30)


def _pattern(size=(96, 64), seed=0) -> Image.Image:
    """A distinct RGB image (a gradient plus seeded noise), so no two are duplicates."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    base = np.concatenate([x.repeat(h, 0), y.repeat(w, 1), (x + y).repeat(1, 0) / 2 + 0 * y], 2)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width=20000, height=20000) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 3)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def rgb48_tiff(array: np.ndarray) -> bytes:
    """An uncompressed big-endian TIFF of a (H, W, 3) uint16 array (16 bits per channel),
    which Pillow reads but cannot write."""
    h, w, _ = array.shape
    pixels = array.astype(">u2").tobytes()
    count = 10
    bits_at = 8 + 2 + 12 * count + 4  # after the header and the one directory
    data_at = bits_at + 6
    entries = [  # tag, type (3 short, 4 long), count, value or offset
        (256, 3, 1, w),  # width
        (257, 3, 1, h),  # height
        (258, 3, 3, bits_at),  # bits per sample: 16, 16, 16
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, data_at),  # strip offset
        (277, 3, 1, 3),  # samples per pixel
        (278, 3, 1, h),  # rows per strip
        (279, 4, 1, len(pixels)),  # strip bytes
        (284, 3, 1, 1),  # chunky planar configuration
    ]
    out = b"MM\x00\x2a" + struct.pack(">IH", 8, count)
    for tag, kind, n, value in entries:
        if kind == 3 and n == 1:
            out += struct.pack(">HHIHH", tag, kind, n, value, 0)
        else:
            out += struct.pack(">HHII", tag, kind, n, value)
    return out + struct.pack(">I", 0) + struct.pack(">HHH", 16, 16, 16) + pixels


def swapped_profile() -> bytes:
    """An ICC profile like sRGB but with the red and green primaries swapped."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entries = {bytes(data[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, g = entries[b"rXYZ"] + 4, entries[b"gXYZ"] + 4  # each entry: offset, size
    data[r : r + 8], data[g : g + 8] = data[g : g + 8], data[r : r + 8]
    return bytes(data)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_messy(folder: Path) -> dict:
    """Write the corpus; returns {"skipped": {name: reason words}, "warnings": {...}, "usable"}."""
    folder.mkdir(parents=True, exist_ok=True)
    w = lambda name, data: (folder / name).write_bytes(data)  # noqa: E731

    # Plain, usable images with captions of every encoding quirk.
    w("good.png", _encoded(_pattern(seed=1), "PNG"))
    w("good.txt", b"a red barn, fields")
    w("bom.png", _encoded(_pattern(seed=2), "PNG"))
    w("bom.txt", "\ufeffzkstyle, a hill\r\nat dusk\r\n".encode())
    w("crlf.jpg", _encoded(_pattern(seed=3), "JPEG", quality=90))
    w("crlf.txt", b"a lake\r\n\r\nmist\r\n")
    w("cp1252.png", _encoded(_pattern(seed=4), "PNG"))
    w("cp1252.txt", "a caf\xe9 at night".encode("cp1252"))
    w("UPPER.JPG", _encoded(_pattern(seed=5), "JPEG"))
    w("long.png", _encoded(_pattern(seed=6), "PNG"))
    w("long.txt", ", ".join(f"tag{i} word" for i in range(60)).encode())
    w("[brackets] (1).png", _encoded(_pattern(seed=7), "PNG"))
    w("日本語 画像.webp", _encoded(_pattern(seed=8), "WEBP", lossless=True))
    w("a.jpg", _encoded(_pattern(seed=9), "JPEG"))
    w("a.png", _encoded(_pattern(seed=10), "PNG"))
    w("a.txt", b"zkstyle, shared caption")
    w("plain.bmp", _encoded(_pattern(seed=11), "BMP"))

    # Broken files.
    jpeg = _encoded(_pattern(seed=12), "JPEG")
    w("truncated.jpg", jpeg[: len(jpeg) // 2])
    png = _encoded(_pattern(seed=13), "PNG")
    w("truncated.png", png[: len(png) // 2])
    w("empty.jpg", b"")
    w("notes.jpg", b"this is a text file renamed to .jpg\n")
    w("bomb.png", bomb_png())
    w("one_pixel.png", _encoded(Image.new("RGB", (1, 1), "blue"), "PNG"))
    w("copy_one.png", _encoded(_pattern(seed=14), "PNG"))
    w("copy_two.png", _encoded(_pattern(seed=14), "PNG"))

    # Odd but usable images.
    w("jpeg_named.png", _encoded(_pattern(seed=15), "JPEG"))
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = RED  # the colour hidden under fully transparent pixels
    w("transparent.png", _encoded(Image.fromarray(rgba), "PNG"))
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([*RED, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    w("palette.png", _encoded(palette, "PNG", transparency=0))
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    w("cmyk.jpg", _encoded(cmyk, "JPEG"))
    grey16 = Image.fromarray(np.full((64, 64), 32768, np.uint16))  # mid grey in 16 bits
    w("grey16.png", _encoded(grey16, "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    w("rotated.jpg", _encoded(_pattern((96, 64), seed=16), "JPEG", exif=exif))
    red = Image.new("RGB", (64, 64), RED)
    w("wide_gamut.png", _encoded(red, "PNG", icc_profile=swapped_profile()))  # shows as green
    w("bad_profile.png", _encoded(red.rotate(45), "PNG", icc_profile=b"not a profile"))
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    w("animated.gif", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    webp = dict(save_all=True, append_images=frames[1:], lossless=True)
    w("animated.webp", _encoded(frames[0].rotate(90), "WEBP", **webp))
    grey_alpha = Image.merge("LA", [Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 0)])
    w("grey_alpha.png", _encoded(grey_alpha, "PNG"))  # black, fully transparent
    w("photo.TIF", _encoded(_pattern(seed=19), "TIFF"))
    grey16_tiff = Image.fromarray(np.full((64, 64), 16384, np.uint16))  # a quarter of white
    w("grey16.tif", _encoded(grey16_tiff, "TIFF"))
    deep = np.zeros((64, 64, 3), np.uint16)
    deep[..., 0], deep[..., 1] = 65535, 32768  # full red, half green, no blue, 16 bits each
    w("deep.tiff", rgb48_tiff(deep))

    # Image formats that are not read: named, never silently ignored.
    w("layers.psd", b"8BPS\x00\x01" + b"\x00" * 64)
    w("phone.HEIC", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 32)
    w("sky.fits", b"SIMPLE  =                    T" + b" " * 50)

    # Ignored entirely.
    w(".hidden.png", _encoded(_pattern(seed=17), "PNG"))
    w("Thumbs.db", b"\x00" * 16)
    w("readme.md", b"# my set\n")
    w("meta.json", b"{}")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._good.png").write_bytes(b"\x00\x05\x16\x07")

    # A repeats folder, and a symlink loop inside it.
    sub = folder / "3_extra"
    sub.mkdir()
    (sub / "inner.png").write_bytes(_encoded(_pattern(seed=18), "PNG"))
    os.symlink("..", sub / "loop")
    os.symlink("self_link.png", folder / "self_link.png")  # a link to itself

    skipped = {
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "empty.jpg": "0-byte",
        "notes.jpg": "not an image",
        "bomb.png": "400,000,000 pixels",
        "one_pixel.png": "too small",
        "copy_two.png": "duplicate of copy_one.png",
        "self_link.png": "symbolic links",
        "layers.psd": "format not supported: convert to PNG or JPEG",
        "phone.HEIC": "format not supported",
        "sky.fits": "format not supported",
    }
    warnings = {
        "cp1252.txt": "not UTF-8",
        "long.png": "CLIP tokens",
        "a.png": "shares the caption a.txt with a.jpg",
        "jpeg_named.png": "a JPEG file named .png",
        "transparent.png": "transparency",
        "palette.png": "transparency",
        "grey16.png": "16-bit",
        "animated.gif": "animated (3 frames)",
        "animated.webp": "animated (3 frames)",
        "grey_alpha.png": "transparency",
        "grey16.tif": "16-bit",
        "deep.tiff": "16-bit",
        "bad_profile.png": "colour profile unreadable",
        "good.png": "lacks the trigger",
    }
    usable = {
        "good.png",
        "bom.png",
        "crlf.jpg",
        "cp1252.png",
        "UPPER.JPG",
        "long.png",
        "[brackets] (1).png",
        "日本語 画像.webp",
        "a.jpg",
        "a.png",
        "plain.bmp",
        "copy_one.png",
        "jpeg_named.png",
        "transparent.png",
        "palette.png",
        "cmyk.jpg",
        "grey16.png",
        "rotated.jpg",
        "animated.gif",
        "animated.webp",
        "grey_alpha.png",
        "wide_gamut.png",
        "bad_profile.png",
        "photo.TIF",
        "grey16.tif",
        "deep.tiff",
        "3_extra/inner.png",
    }
    return {"skipped": skipped, "warnings": warnings, "usable": usable}


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (links not followed): bytes or link target, mode and mtime."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if path.is_symlink():
                content = os.readlink(path)
            elif path.is_file():
                content = path.read_bytes()
            else:
                content = None
            state[str(path.relative_to(folder))] = (content, st.st_mode, st.st_mtime_ns)
    return state


def make_read_only(folder: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(0o444)
        Path(dirpath).chmod(0o555)


def make_writable(folder: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(folder):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(0o644)
