"""How a scan's images fill epochs: steps per epoch, the plan line and its batch-size warning."""

from __future__ import annotations

import math
from collections import Counter

from sdlora.buckets import batches_per_epoch
from sdlora.dataset import Scan


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
