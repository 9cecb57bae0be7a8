"""`sdlora caption`: write caption sidecars for images that have none.

This is the one place sdlora writes into a dataset folder, and only when asked to. An existing
caption is never replaced unless `overwrite` is set. Captions come from a template
(`{trigger}`, `{name}`: the file name in words) or, optionally, from a BLIP captioning model
through transformers (`{caption}`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdlora.captions import caption_with_trigger, template_caption
from sdlora.decode import ImageProblem, open_rgb
from sdlora.errors import SdloraError
from sdlora.export import write_atomic
from sdlora.folders import Problem, find_sidecar, walk_images

CAPTIONERS = ("blip",)
BLIP_EXAMPLE = "Salesforce/blip-image-captioning-base"


@dataclass
class CaptionRun:
    """What `write_captions` did, by file."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    """Images whose existing caption was left alone."""
    skipped: list[Problem] = field(default_factory=list)


def write_captions(
    root: str | Path,
    trigger: str,
    template: str | None = None,
    caption_ext: str = ".txt",
    overwrite: bool = False,
    captioner: Callable[[Image.Image], str] | None = None,
) -> CaptionRun:
    """Write `<stem><caption_ext>` beside every readable image without a caption.

    Two images with one stem (`a.jpg`, `a.png`) get `a.jpg.txt` and `a.png.txt`, which the
    scan prefers over `a.txt`. The default template is `{trigger}`, or `{trigger}, {caption}`
    with a captioner.
    """
    root = Path(root)
    if not root.is_dir():
        raise SdloraError(f"dataset folder {root} does not exist")
    if template is None:
        template = "{trigger}, {caption}" if captioner else "{trigger}"
    run = CaptionRun()
    files, listings = walk_images(root, run.skipped)  # folders that cannot be listed
    stems = Counter((p.parent, p.stem.lower()) for p, _ in files)
    for path, _ in files:
        existing = find_sidecar(path, listings[path.parent], caption_ext)
        if existing is not None and not overwrite:
            run.kept.append(path)
            continue
        try:
            image = open_rgb(path).image
        except ImageProblem as e:
            run.skipped.append(Problem(path, e.reason))
            continue
        try:
            text = template_caption(
                template, trigger, name=path.stem, caption=captioner(image) if captioner else ""
            )
        except ValueError as e:
            raise SdloraError(f"--template: {e}") from None
        shared = stems[(path.parent, path.stem.lower())] > 1
        target = existing or path.with_name((path.name if shared else path.stem) + caption_ext)
        caption = caption_with_trigger(text, trigger) + "\n"
        try:
            write_atomic(target, caption.encode("utf-8"))
        except OSError as e:  # e.g. a read-only folder
            run.skipped.append(Problem(path, f"cannot write {target.name}: {e.strerror or e}"))
            continue
        listings[path.parent][target.name.lower()] = target.name
        run.written.append(target)
    return run


def blip_captioner(model: str | None, device: str = "cpu", max_new_tokens: int = 40):
    """A function image -> caption from a BLIP checkpoint (local folder or hub id)."""
    if not model:
        raise SdloraError(
            "--captioner blip needs --model: a local folder holding a BLIP captioning "
            f"checkpoint (config.json, weights, processor files) or a hub id such as {BLIP_EXAMPLE}"
        )
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(model)
        net = BlipForConditionalGeneration.from_pretrained(model).to(device).eval()
    except (OSError, ValueError) as e:
        raise SdloraError(
            f"cannot load a BLIP model from {model!r} ({e.__class__.__name__}); pass --model a "
            f"local BLIP checkpoint folder, or a hub id such as {BLIP_EXAMPLE} with a network"
        ) from None

    max_new_tokens = min(max_new_tokens, net.config.text_config.max_position_embeddings - 2)

    def caption(image: Image.Image) -> str:
        inputs = processor(images=image, return_tensors="pt").to(device)
        with torch.no_grad():
            ids = net.generate(**inputs, max_new_tokens=max_new_tokens)
        return processor.decode(ids[0], skip_special_tokens=True).strip()

    return caption
