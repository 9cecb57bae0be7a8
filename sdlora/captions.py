"""Captions: sidecar files, the trigger word, per-step tag augmentation, token counts.

A caption file is UTF-8 (a BOM is stripped; Windows and old-Mac line ends are normalised).
Multi-line rule: every non-empty line is stripped and the lines are joined with ", ", so a
tag-per-line file and a one-line tag list give the same caption.

The trigger word is always the first tag: put first when a caption lacks it, moved first when it
sits elsewhere as a tag, and kept first when tags are shuffled.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

CLIP_MAX_TOKENS = 77
"""CLIP's context, begin and end tokens included: the text encoder ignores what lies beyond."""

# CLIP's own BPE vocabulary, shipped with the single-file configs (see model_configs/README.md).
CLIP_TOKENIZER = Path(__file__).resolve().parent / "model_configs" / "sd15" / "tokenizer"


class CaptionProblem(Exception):
    """A caption file that cannot be read; `reason` is worded for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_caption_file(path: Path) -> str:
    """The normalised caption in `path` ('' when empty); CaptionProblem when it is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionProblem(
            f"caption is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "re-save it as UTF-8; the fallback caption is used"
        ) from None
    return normalise_caption(text)


def normalise_caption(text: str) -> str:
    """BOM stripped, line ends normalised, non-empty lines joined with ', ', spaces collapsed."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return ", ".join(line.strip(" ,") for line in lines if line.strip(" ,"))


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def caption_with_trigger(caption: str, trigger: str) -> str:
    """`caption` with `trigger` as its first tag (added, or moved from where it was a tag)."""
    tags = split_tags(caption)
    if not trigger:
        return ", ".join(tags)
    key = trigger.lower()
    for i, tag in enumerate(tags):
        if tag.lower() == key:
            return ", ".join([tag, *tags[:i], *tags[i + 1 :]])
    if tags and _names(tags[0], trigger):
        return ", ".join(tags)  # prose whose first clause names the trigger ("zk style of a cat")
    return ", ".join([trigger, *tags])


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether the caption names the trigger as a tag or a word (before sdlora adds it)."""
    return any(_names(tag, trigger) for tag in split_tags(caption))


def _names(text: str, trigger: str) -> bool:
    """`trigger` appears in `text` as whole words (case ignored)."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, re.IGNORECASE) is not None


def augment_caption(
    caption: str,
    rng: random.Random,
    keep_tokens: int = 1,
    shuffle: bool = False,
    tag_dropout: float = 0.0,
    caption_dropout: float = 0.0,
) -> str:
    """One training-step variant of `caption`.

    `caption_dropout`: chance the whole caption becomes '' (trains the unconditional case).
    The first `keep_tokens` tags (the trigger at least, when keep_tokens >= 1) stay in place;
    the others are dropped with chance `tag_dropout` each and shuffled when `shuffle`.
    """
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(kept + rest)


def clip_token_count(caption: str) -> int:
    """CLIP tokens of `caption`, begin and end tokens included, with CLIP's own vocabulary."""
    return len(_clip_tokenizer()(caption, truncation=False, verbose=False).input_ids)


@functools.cache
def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)


def template_caption(template: str, trigger: str, name: str = "", caption: str = "") -> str:
    """Fill a caption template: `{trigger}`, `{name}` (file stem, `_`/`-` as spaces), `{caption}`
    (a captioning model's text)."""
    pretty = " ".join(name.replace("_", " ").replace("-", " ").split())
    try:
        text = template.format(trigger=trigger, name=pretty, caption=caption)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"caption template {template!r} is invalid ({e}); it may use {{trigger}}, "
            "{name} and {caption}"
        ) from None
    return normalise_caption(text)
