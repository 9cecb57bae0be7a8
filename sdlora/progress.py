"""Which step is the good one: the checkpoints' evaluations, the rule that picks one, and the
pictures that show the run's progress (progress.png, checkpoints.png).

A checkpoint's evaluation is a dict: `step`, `val_loss`, `style_shift_with_trigger` and
`drift_without_trigger` (the VAE Gram statistic; None without style scores),
`palette_shift_with_trigger` and `palette_drift_without_trigger` (the palette's), and `lora`,
the LoRA file of that step in the run folder (None when none was written). The rule reads
the first two.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdlora.export import write_atomic
from sdlora.images import save_png

DRIFT_LIMIT = 0.1
"""Drift without the trigger above this leaks the style into every prompt."""
VAL_RISE = 0.02
"""A validation loss this much (relative) above the lowest so far counts as rising."""
STYLE_MARGIN = 0.05
"""Style shifts this close to the strongest count as equally strong."""


def best_step(
    entries: list[dict],
    drift_limit: float = DRIFT_LIMIT,
    val_rise: float = VAL_RISE,
    margin: float = STYLE_MARGIN,
) -> tuple[dict, str] | None:
    """The recommended checkpoint of `entries` (in step order) and the rule that chose it, in
    words; None when no entry has a LoRA file.

    Only checkpoints with a LoRA file are chosen. The rule, in order:
    1. validation loss not rising: leave out a checkpoint whose validation loss is more than
       `val_rise` (relative) above the lowest of the checkpoints up to it;
    2. style behind the trigger: leave out a checkpoint whose drift without the trigger is
       beyond `drift_limit` either way (towards the style, or away from it: both change the
       prompts without the trigger); when every one is, keep those within `margin` of the
       least drift;
    3. strong style: of those left, the strongest style shift with the trigger; shifts within
       `margin` of it count as equally strong (the probe's few images are noisy), and of those
       the lowest validation loss is taken (the earliest of equal ones).
    Without style scores, steps 2 and 3 become: the lowest validation loss (the earliest of
    equal ones). A filter that would leave nothing is not applied, and the words say so.
    """
    candidates = [e for e in entries if e.get("lora")]
    if not candidates:
        return None
    why = []
    steady = [e for e in candidates if not _val_rising(e, entries, val_rise)]
    if steady:
        candidates = steady
        why.append("validation loss not rising")
    else:
        why.append("validation loss rising at every checkpoint")
    if any(e.get("style_shift_with_trigger") is None for e in candidates):
        low = min(e["val_loss"] for e in candidates)
        chosen = next(e for e in candidates if e["val_loss"] == low)
        return chosen, f"lowest validation loss ({why[0]}; no style scores)"
    tame = [e for e in candidates if abs(e["drift_without_trigger"]) <= drift_limit]
    if tame:
        why.append(f"|drift| <= {drift_limit:g}")
    else:
        least = min(abs(e["drift_without_trigger"]) for e in candidates)
        tame = [e for e in candidates if abs(e["drift_without_trigger"]) <= least + margin]
        why.append(f"every checkpoint drifts over {drift_limit:g}: the least drift")
    strongest = max(e["style_shift_with_trigger"] for e in tame)
    strong = [e for e in tame if e["style_shift_with_trigger"] >= strongest - margin]
    chosen = min(strong, key=lambda e: (e["val_loss"], e["step"]))
    return chosen, f"strongest style with the trigger ({', '.join(why)})"


def _val_rising(entry: dict, entries: list[dict], val_rise: float) -> bool:
    earlier = [e["val_loss"] for e in entries if e["step"] <= entry["step"]]
    return entry["val_loss"] > min(earlier) * (1 + val_rise)


def best_line(entry: dict, reason: str, entries: list[dict]) -> str:
    """The terminal's one line about the chosen step."""
    parts = []
    if entry.get("style_shift_with_trigger") is not None:
        parts.append(
            f"style {entry['style_shift_with_trigger']:.2f}, "
            f"drift {entry['drift_without_trigger']:.2f}"
        )
    lowest = min(entries, key=lambda e: (e["val_loss"], e["step"]))
    if lowest is entry:
        parts.append(f"val loss {entry['val_loss']:.4g} (the lowest)")
    else:
        above = entry["val_loss"] / lowest["val_loss"] - 1
        parts.append(
            f"val loss {entry['val_loss']:.4g} ({above:+.1%} over step {lowest['step']}'s)"
        )
    return f"best step: {entry['step']} — {', '.join(parts)}; chosen for: {reason}"


def write_checkpoints(path: Path, entries: list[dict]) -> Path:
    return write_atomic(path, json.dumps(entries, indent=2).encode())


def read_checkpoints(path: Path, up_to: int) -> list[dict]:
    """The entries of an earlier checkpoints.json up to step `up_to` (a resumed run)."""
    if not path.is_file():
        return []
    return [e for e in json.loads(path.read_text(encoding="utf-8")) if e["step"] <= up_to]


def checkpoint_grid(sample_grids: list[Path], path: Path, title: str) -> Path | None:
    """The sample grids of the checkpoints one under another (same prompts, same seeds)."""
    grids = [Image.open(p).convert("RGB") for p in sample_grids if p.is_file()]
    if len(grids) < 2:
        return None
    top = 16
    canvas = Image.new("RGB", (max(g.width for g in grids), top + sum(g.height for g in grids)))
    canvas.paste("white", (0, 0, canvas.width, canvas.height))
    ImageDraw.Draw(canvas).text((4, 2), title, fill="black", font=ImageFont.load_default())
    y = top
    for grid in grids:
        canvas.paste(grid, (0, y))
        y += grid.height
    return save_png(canvas, path)


LOSS, SMOOTH, VAL = (170, 190, 230), (20, 60, 160), (200, 30, 30)
SHIFT, DRIFT, MARK, BEST = (20, 120, 40), (230, 130, 0), (200, 200, 200), (20, 160, 60)
PALETTE_SHIFT, PALETTE_DRIFT = (150, 210, 160), (245, 200, 140)
STYLE_SERIES = (
    ("palette_shift_with_trigger", PALETTE_SHIFT),
    ("palette_drift_without_trigger", PALETTE_DRIFT),
    ("style_shift_with_trigger", SHIFT),
    ("drift_without_trigger", DRIFT),
)


def save_progress_plot(
    losses: list[float],
    validation: list[tuple[int, float]],
    entries: list[dict],
    best: int | None,
    path: Path,
    size=(720, 480),
) -> Path:
    """Two panels against the step: above, the training loss (light, its moving average
    dark) and the validation loss (red); below, the style shift with the trigger (green)
    and the drift without it (orange) at the checkpoints, the palette's in lighter colours.
    Checkpoints are grey lines, the best step a green one."""
    width, height = size
    left, right, gap = 48, width - 12, 24
    panels = ((12, height // 2 - gap // 2), (height // 2 + gap // 2, height - 28))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    last = max([len(losses)] + [s for s, _ in validation] + [e["step"] for e in entries] + [1])

    def x(step):
        return left + (right - left) * step / last

    for top, bottom in panels:
        for e in entries:
            colour, w = (BEST, 2) if e["step"] == best else (MARK, 1)
            draw.line([(x(e["step"]), top), (x(e["step"]), bottom)], fill=colour, width=w)
        draw.rectangle((left, top, right, bottom), outline="black")
    # Above: losses.
    top, bottom = panels[0]
    values = losses + [v for _, v in validation]
    if values:
        low, high = min(values), max(values)
        y = _scale(low, high, top, bottom)
        smooth = _moving_average(losses, max(1, len(losses) // 20))
        for series, colour in ((losses, LOSS), (smooth, SMOOTH)):
            if len(series) > 1:
                draw.line([(x(i + 1), y(v)) for i, v in enumerate(series)], fill=colour)
        _series(draw, [(x(s), y(v)) for s, v in validation], VAL)
        draw.text((2, top), f"{high:.3g}", fill="black", font=font)
        draw.text((2, bottom - 10), f"{low:.3g}", fill="black", font=font)
    draw.text((left + 4, top + 2), "loss", fill=SMOOTH, font=font)
    draw.text((left + 40, top + 2), "validation loss", fill=VAL, font=font)
    # Below: style scores.
    top, bottom = panels[1]
    scored = [e for e in entries if e.get("style_shift_with_trigger") is not None]
    scores = [e[k] for e in scored for k, _ in STYLE_SERIES if e.get(k) is not None]
    low, high = min([0.0, *scores]), max([1.0, *scores])
    y = _scale(low, high, top, bottom)
    draw.line([(left, y(0)), (right, y(0))], fill=MARK)
    for key, colour in STYLE_SERIES:
        _series(draw, [(x(e["step"]), y(e[key])) for e in scored if e.get(key) is not None], colour)
    draw.text((2, top), f"{high:.2g}", fill="black", font=font)
    draw.text((2, y(0) - 5), "0", fill="black", font=font)
    draw.text((left + 4, top + 2), "style shift with trigger", fill=SHIFT, font=font)
    draw.text((left + 160, top + 2), "drift without trigger", fill=DRIFT, font=font)
    draw.text((left + 300, top + 2), "(VAE Gram; light: palette)", fill="black", font=font)
    if not scored:
        draw.text((left + 4, top + 16), "no style scores (sample.report_images = 0)", fill="black",
                  font=font)  # fmt: skip
    draw.text((left, height - 16), "step 0", fill="black", font=font)
    draw.text((right - 60, height - 16), f"step {last}", fill="black", font=font)
    if best is not None:
        draw.text((x(best) + 3, height - 16), f"best: {best}", fill=BEST, font=font)
    return save_png(canvas, path)


def _moving_average(values: list[float], window: int) -> list[float]:
    spans = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [sum(span) / len(span) for span in spans]


def _scale(low: float, high: float, top: int, bottom: int):
    span = (high - low) or 1.0
    return lambda v: bottom - (bottom - top) * (v - low) / span


def _series(draw, points: list[tuple[float, float]], colour) -> None:
    """A line through `points` with a dot on each."""
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    for px, py in points:
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
