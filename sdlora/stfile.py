"""Opening a LoRA file: a safetensors header checked against the file's bytes before anything is
loaded (a missing, empty, truncated, git-lfs pointer or non-safetensors file is named as such),
its tensors loaded (a pickle only when allowed, and then with weights_only), and the hash of its
tensor bytes that Civitai and A1111 name it by."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdlora.errors import SdloraError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_safetensors_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, from its header alone.

    Raises a message naming the file for a missing, empty, truncated, git-lfs pointer or
    non-safetensors file, and for a header that does not describe its tensors' bytes.
    """
    path = Path(path)
    try:
        _require_file(path)
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if size == 0:
                raise SdloraError(f"{path} is empty (0 bytes): the download or copy did not finish")
            if head.startswith(b"version "):
                raise SdloraError(
                    f"{path} is a git-lfs pointer, not the weights: run `git lfs pull` in its repo"
                )
            if len(head) < 8:
                raise SdloraError(f"{path} is truncated ({size} bytes): download it again")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > 100_000_000:
                raise SdloraError(
                    f"{path} is not a safetensors file or is truncated (header of {n} bytes "
                    f"in a file of {size}); download it again"
                )
            raw = f.read(n)
    except (OSError, ValueError) as e:  # unreadable, a name the system refuses
        raise SdloraError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested beyond reason
        raise SdloraError(f"{path} has a corrupt safetensors header; download it again") from None
    if not isinstance(header, dict):
        raise SdloraError(
            f"{path} has a safetensors header that is a JSON {type(header).__name__}, "
            "not an object of tensors; the file is damaged or not safetensors"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SdloraError(
            f"{path} has safetensors metadata that is not text keys and values; "
            "the file is damaged or was written by a broken tool"
        )
    end = 0
    for name, entry in header.items():
        end = max(end, _tensor_end(path, name, entry))
    if 8 + n + end > size:
        raise SdloraError(
            f"{path} is truncated: {size} bytes where the header describes {8 + n + end}; "
            "download it again"
        )
    return header, metadata


# safetensors dtype names -> bytes per element.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _tensor_end(path: Path, name: str, entry) -> int:
    """Where tensor `name`'s bytes end, after checking its header entry describes them."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SdloraError(f"{where} has no description (dtype, shape, data_offsets) in the header")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SdloraError(f"{where} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise SdloraError(f"{where} has no valid shape (got {shape!r})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise SdloraError(f"{where} has no valid data_offsets (got {offsets!r})")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SdloraError(
            f"{where} has shape {shape} ({dtype}: {expected} bytes) but a byte range of "
            f"{end - begin}; the file is damaged"
        )
    return end


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise SdloraError(f"{path} " + ("is not a file" if path.exists() else "does not exist"))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a `.safetensors` file, or of a pickle only when allowed."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            _require_file(path)
        except (OSError, ValueError) as e:
            raise SdloraError(f"{path} cannot be read: {e}") from None
        if not allow_pickle:
            raise SdloraError(
                f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                ".safetensors, or pass --allow-pickle to load it with weights_only=True"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is reported by file
            raise SdloraError(
                f"{path} could not be loaded safely (weights_only=True): {e}"
            ) from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise SdloraError(f"{path} holds a {type(data).__name__}, not tensors by name")
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        return {k: v for k, v in tensors.items() if isinstance(k, str)}, {}
    _, metadata = read_safetensors_header(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise SdloraError(f"{path} is not a readable safetensors file: {e}") from None


def sha256_after_header(data: bytes) -> str:
    """sha256 of a safetensors file's tensor bytes (independent of its metadata): AutoV3."""
    header_len = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_len :]).hexdigest()
