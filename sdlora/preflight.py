"""What a scan holds, in words and numbers: the `sdlora check` report (per-file status, counts,
aspect ratios, buckets), the problem lines training prints, and the per-folder counts that a
LoRA's metadata records.

`report(scan)` is a plain dict (the `--json` output); `format_report` is its text form. File
names and reasons are escaped (`printable`) in both, so a newline or a byte that is not UTF-8 in
a name keeps the text one line per file and the JSON printable.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from sdlora.captions import split_tags
from sdlora.dataset import Scan
from sdlora.epochs import epoch_plan
from sdlora.folders import IMAGE_EXTENSIONS, printable, relative_name

DEFAULT_STEPS = 1000  # the steps the guidance line assumes (train.steps' default)


def report(scan: Scan, steps: int = DEFAULT_STEPS, batch_size: int = 1) -> dict:
    """Everything `sdlora check` shows, JSON-ready; `trainable` is False with no usable image."""
    files: dict[str, dict] = {}
    for example in scan.examples:
        files[_name(example.path, scan)] = {
            "status": "ok",
            "size": list(example.size),
            "bucket": f"{example.bucket[0]}x{example.bucket[1]}",
            "repeats": example.repeats,
            "caption": example.caption,
            "reasons": [],
        }
    for problem in scan.skipped:
        reasons = [printable(problem.reason)]
        files[_name(problem.path, scan)] = {"status": "skipped", "reasons": reasons}
    for problem in scan.warnings:
        entry = files.setdefault(_name(problem.path, scan), {"status": "ok", "reasons": []})
        entry["reasons"].append(printable(problem.reason))
        if entry["status"] == "ok":
            entry["status"] = "warning"
    ratios = [w / h for w, h in (e.size for e in scan.examples)]
    return {
        "folder": printable(str(scan.root)),
        "resolution": scan.resolution,
        "trainable": bool(scan.examples),
        "usable": len(scan.examples),
        "skipped": [_problem(p, scan) for p in scan.skipped],
        "warnings": [_problem(p, scan) for p in scan.warnings],
        "files": [{"file": name, **files[name]} for name in sorted(files)],
        "aspect_ratios": {
            "portrait": sum(r < 0.95 for r in ratios),
            "square": sum(0.95 <= r <= 1.05 for r in ratios),
            "landscape": sum(r > 1.05 for r in ratios),
            "min": round(min(ratios), 3) if ratios else None,
            "max": round(max(ratios), 3) if ratios else None,
        },
        "buckets": scan.bucket_counts(),
        "plan": epoch_plan(scan, steps, batch_size) if scan.examples else None,
    }


def format_report(data: dict) -> str:
    """The report as aligned text lines, one per file, then the totals."""
    lines = [f"sdlora check {data['folder']} (resolution {data['resolution']})"]
    width = max((display_width(f["file"]) for f in data["files"]), default=0)
    for f in data["files"]:
        parts = [f"{f['size'][0]}x{f['size'][1]} -> {f['bucket']}"] if "size" in f else []
        detail = "; ".join(parts + f["reasons"])
        padding = " " * (width - display_width(f["file"]))
        lines.append(f"  {f['status']:<8} {f['file']}{padding}  {detail}")
    lines.append(
        f"{data['usable']} usable, {len(data['skipped'])} skipped, {len(data['warnings'])} warnings"
    )
    a = data["aspect_ratios"]
    if data["usable"]:
        lines.append(
            f"aspect ratios (w/h): {a['portrait']} portrait, {a['square']} square, "
            f"{a['landscape']} landscape; from {a['min']} to {a['max']}"
        )
        buckets = ", ".join(f"{b} ({n})" for b, n in data["buckets"].items())
        lines.append(f"buckets: {buckets}")
        lines.append(f"at train.steps={DEFAULT_STEPS}, batch 1: {data['plan']}")
        lines.append("trainable: yes")
    elif data["files"]:
        lines.append("trainable: no usable image (see the reasons above)")
    else:
        lines.append(
            f"trainable: no usable image: no image files found ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return "\n".join(lines)


def display_width(text: str) -> int:
    """Terminal columns of `text`: wide (CJK) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def summarise_problems(scan: Scan, limit: int = 3) -> list[str]:
    """Report lines: every skipped file; warnings with the same reason grouped past `limit`."""
    lines = [
        f"skipped {printable(relative_name(p.path, scan.root))}: {printable(p.reason)}"
        for p in scan.skipped
    ]
    groups: dict[str, list[Path]] = {}
    for p in scan.warnings:
        groups.setdefault(printable(p.reason), []).append(p.path)
    for reason, paths in groups.items():
        names = [printable(relative_name(path, scan.root)) for path in paths]
        if len(names) > limit:
            shown = ", ".join(names[:limit])
            lines.append(f"warning: {reason} ({len(names)} files: {shown}, ...)")
        else:
            lines += [f"warning {name}: {reason}" for name in names]
    return lines


def tag_frequency(scan: Scan) -> dict[str, dict[str, int]]:
    """`{folder_name: {tag: count}}` over the captions, as sd-scripts records it."""
    counts: dict[str, dict[str, int]] = {}
    for example in scan.examples:
        tags = counts.setdefault(_folder_name(scan, example.path.parent), {})
        for tag in split_tags(example.caption.lower()):
            tags[tag] = tags.get(tag, 0) + 1
    return counts


def folder_counts(scan: Scan) -> dict[str, dict[str, int]]:
    """`{folder: {"n_repeats": r, "img_count": n}}` (sd-scripts' `ss_dataset_dirs`)."""
    dirs: dict[str, dict[str, int]] = {}
    for example in scan.examples:
        entry = dirs.setdefault(
            _folder_name(scan, example.path.parent), {"n_repeats": example.repeats, "img_count": 0}
        )
        entry["img_count"] += 1
    return dirs


def _problem(problem, scan: Scan) -> dict:
    return {"file": _name(problem.path, scan), "reason": printable(problem.reason)}


def _name(path: Path, scan: Scan) -> str:
    if path == scan.root:
        return "."
    try:
        return printable(str(path.relative_to(scan.root)))
    except ValueError:
        return printable(str(path))


def _folder_name(scan: Scan, folder) -> str:
    """A folder as sd-scripts names it in its metadata: the root by its name, others by path."""
    return scan.root.name if folder == scan.root else relative_name(folder, scan.root)
