"""Lower rank by SVD: `sdlora resize` (a LoRA or LoCon file to a smaller rank) and
`sdlora extract` (a LoRA from the difference of two checkpoints) share `factorize`.

Each module's update ΔW is split by a truncated SVD into `down` [r, in(, k, k)] and
`up` [out, r(, 1, 1)]. What a module keeps is reported as sd-scripts' `resize_lora` does:
the Frobenius fraction ‖ΔW_r‖ / ‖ΔW‖ = sqrt(Σ kept σ² / Σ σ²).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.families import detect_lora_family
from sdlora.lora import Lora, LoraModule, most_common
from sdlora.lorafile import lora_from_state_dict, require_finite
from sdlora.stfile import load_state_dict

# Rank chosen per module by `dynamic` (capped at the rank asked for), as sd-scripts names them:
# keep singular values down to σ_max / param; keep until Σσ reaches `param` of the total; keep
# until the Frobenius fraction reaches `param`.
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
# File keys of adapters that are no low-rank product of two matrices, so no SVD applies.
NOT_RESIZABLE = {
    ".hada_w1": "LoHa",
    ".lokr_w1": "LoKr",
    ".lora_mid": "LoCon with CP decomposition (lora_mid)",
    ".oft_": "OFT",
    ".on_input": "IA3",
    ".a1.weight": "GLoRA",
    ".diff": "full-weight difference",
}


@dataclass
class Kept:
    """What one module kept: the rank and the Frobenius fraction of its update."""

    component: str
    path: str
    rank: int
    was: int
    fraction: float
    norm: float
    """‖ΔW‖_F, which weighs the module in the overall fraction."""


@dataclass
class Report:
    modules: list[Kept] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Modules left out (extract: no difference between the two checkpoints)."""

    @property
    def overall(self) -> float:
        """Frobenius fraction of all updates together: sqrt(Σ kept² / Σ total²)."""
        total = sum(k.norm**2 for k in self.modules)
        kept = sum((k.fraction * k.norm) ** 2 for k in self.modules)
        return math.sqrt(kept / total) if total else 1.0

    def lines(self, verbose: bool = False, show: int = 5) -> list[str]:
        """The report as text: every module with `verbose`, else the `show` that kept least."""
        worst = sorted(self.modules, key=lambda k: k.fraction)
        listed = sorted(self.modules, key=lambda k: (k.component, k.path)) if verbose else worst
        out = [
            f"  {k.component}:{k.path}  rank {k.was} -> {k.rank}  kept {k.fraction:.2%}"
            for k in listed[: None if verbose else show]
        ]
        if not verbose and len(self.modules) > show:
            out.insert(0, f"least kept ({show} of {len(self.modules)} modules; --verbose: all):")
        ranks = "/".join(str(r) for r in sorted({k.rank for k in self.modules}))
        if worst:
            out.append(
                f"{len(self.modules)} modules, rank {ranks}: kept {self.overall:.2%} of the "
                f"update (Frobenius), lowest module {worst[0].fraction:.2%}"
            )
        if self.skipped:
            out.append(f"{len(self.skipped)} modules left out: no difference")
        return out


def factorize(
    delta: torch.Tensor, rank: int, dynamic: str | None = None, param: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, kept fraction) with up @ down ≈ `delta` at rank ≤ `rank` (float32).

    The singular values are split evenly (√σ on each side), which keeps both factors in
    fp16's range where putting σ on one side alone would not.
    """
    flat = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    if dynamic is not None:
        r = min(r, dynamic_rank(s, dynamic, param))
    total = s.square().sum()
    fraction = float((s[:r].square().sum() / total).sqrt()) if total > 0 else 1.0
    root = s[:r].sqrt()
    down = (root[:, None] * vh[:r]).reshape(r, *delta.shape[1:])
    up = u[:, :r] * root[None, :]
    if delta.dim() == 4:
        up = up.reshape(*up.shape, 1, 1)
    return down.contiguous(), up.contiguous(), fraction


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """The smallest rank `method` keeps of singular values `s` (descending), at least 1."""
    if method == "sv_ratio":
        keep = int((s >= s[0] / param).sum())
    elif method == "sv_cumulative":
        keep = int((s.cumsum(0) / s.sum() < param).sum()) + 1
    elif method == "sv_fro":
        keep = int(((s.square().cumsum(0) / s.square().sum()).sqrt() < param).sum()) + 1
    else:
        raise SdloraError(f"unknown --dynamic method {method!r}; use {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(keep, s.numel()))


def check_dynamic(method: str | None, param: float | None) -> None:
    """Refuse a dynamic method without a sensible parameter."""
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise SdloraError(f"unknown --dynamic method {method!r}; use {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise SdloraError(f"--dynamic {method} needs --dynamic-param")
    if method == "sv_ratio" and not param >= 1:
        raise SdloraError(f"--dynamic-param for sv_ratio is a ratio of at least 1, got {param}")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise SdloraError(f"--dynamic-param for {method} is a fraction in (0, 1], got {param}")


def is_conv(module: LoraModule) -> bool:
    """A module on a convolution with a kernel wider than 1x1 (LoCon's conv rank applies)."""
    return module.down.dim() == 4 and tuple(module.down.shape[2:]) != (1, 1)


def read_resizable(path: str | Path, allow_pickle: bool = False) -> Lora:
    """Read a LoRA or LoCon file for `resize`; any other adapter is refused by name."""
    tensors, metadata = load_state_dict(path, allow_pickle)
    refuse_unresizable(tensors, str(path))
    lora = lora_from_state_dict(tensors, metadata, source=str(path))
    require_finite(lora, str(path))
    lora.family = detect_lora_family(lora).family
    return lora


def refuse_unresizable(keys, source: str) -> None:
    """Refuse a file of an adapter that is not a product of two matrices, naming it."""
    for marker, name in NOT_RESIZABLE.items():
        if any(marker in k for k in keys):
            raise SdloraError(
                f"{source} is a {name} file; resize works on LoRA and LoCon files only"
            )


def resize_lora(
    lora: Lora,
    rank: int,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    source: str = "the LoRA",
) -> tuple[Lora, Report]:
    """`lora` with every module of a higher rank cut to `rank` (convolutions wider than 1x1
    to `conv_rank`, default `rank`); a module at or below its target is kept as it is.

    Alpha follows the rank (alpha · new / old), so alpha / rank and the update's scale stay.
    DoRA's magnitudes are kept: they rescale the base weight plus the (now approximate) ΔW.
    """
    check_dynamic(dynamic, param)
    ranks = {m.rank for _, _, m in lora.modules()}
    conv_ranks = {m.rank for _, _, m in lora.modules() if is_conv(m)}
    for asked, have, flag in ((rank, ranks, "--rank"), (conv_rank, conv_ranks, "--conv-rank")):
        if asked is not None and asked < 1:
            raise SdloraError(f"{flag} must be at least 1, got {asked}")
        if asked is not None and have and asked > max(have):
            raise SdloraError(
                f"{flag} {asked} is larger than the rank of {source} ({max(have)}); "
                "resize only lowers rank"
            )
    out = Lora(family=lora.family, metadata=dict(lora.metadata), file_format=lora.file_format)
    report = Report()
    for component, path, m in lora.modules():
        if set(m.extra) - {"dora_scale"}:
            raise SdloraError(
                f"{source}: module {component}:{path} is not a LoRA or LoCon module "
                f"({', '.join(sorted(m.extra))}); resize works on LoRA and LoCon files only"
            )
        target = (conv_rank or rank) if is_conv(m) else rank
        delta = m.up.float().flatten(1) @ m.down.float().flatten(1)  # alpha / rank applies after
        norm = float(delta.norm()) * abs(m.alpha) / m.rank
        if m.rank <= target and dynamic is None:
            new = LoraModule(m.down.float(), m.up.float(), m.alpha, dict(m.extra))
            fraction = 1.0
        else:
            delta = delta.reshape(m.up.shape[0], *m.down.shape[1:])
            down, up, fraction = factorize(delta, min(target, m.rank), dynamic, param or 0.0)
            new = LoraModule(down, up, m.alpha * down.shape[0] / m.rank, dict(m.extra))
        out.components.setdefault(component, {})[path] = new
        report.modules.append(Kept(component, path, new.rank, m.rank, fraction, norm))
    update_metadata(out)
    return out, report


def update_metadata(lora: Lora) -> None:
    """sd-scripts' rank and alpha fields (and LyCORIS's conv_dim/conv_alpha) for `lora`'s
    modules now; the hashes are dropped, the writer adds them anew."""
    meta = lora.metadata
    for key in [k for k in meta if k.startswith("sshs_")] + ["modelspec.hash_sha256"]:
        meta.pop(key, None)
    linear = [m for _, _, m in lora.modules() if not is_conv(m)]
    convs = [m for _, _, m in lora.modules() if is_conv(m)]
    if linear:
        meta["ss_network_dim"] = str(most_common([m.rank for m in linear]))
        meta["ss_network_alpha"] = str(float(most_common([m.alpha for m in linear])))
    if convs and "ss_network_args" in meta:
        try:
            args = json.loads(meta["ss_network_args"])
        except ValueError:
            args = None
        if isinstance(args, dict):
            args["conv_dim"] = str(most_common([m.rank for m in convs]))
            args["conv_alpha"] = str(float(most_common([m.alpha for m in convs])))
            meta["ss_network_args"] = json.dumps(args)
