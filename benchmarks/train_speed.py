"""Training speed and memory: samples/s and peak memory per setting, printed as a table.

    python benchmarks/train_speed.py            # CPU rows (and the CUDA rows on a GPU)
    python benchmarks/train_speed.py --quick    # tiny model only

Each row is one real `sdlora.train()` run in its own process (so peak memory is that run's),
on a folder of images at the row's resolution. Rows:
- tiny:sd1 at 64 px and the SD 1.5 architecture with random weights (`random:sd1`) at 256 px,
  with latents cached (sdlora's default) or encoded every step, gradient checkpointing on/off;
- the comparison with diffusers' `train_text_to_image_lora.py`: its training loop rebuilt step
  for step (`reference_loop.py`, which says how) against sdlora on the same UNet-only LoRA
  (rank 16, attention), model, images (512 px files, trained at 256 with random flips),
  steps (`--compare-steps`, 32 by default) and precision, neither drawing samples; the ratios
  of loop time, process wall time and the loop's peak memory are printed under the table;
- on CUDA: SD 1.5 at 512 and SDXL at 1024 in bf16, batch 1/4/8, with model FLOPs
  utilisation from FLOPs counted on one training step (torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "datasets_examples" / "stripes"
# Dense bf16 peak of common accelerators, TFLOP/s (vendor figures), for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def make_images(folder: Path, size: int, count: int = 8) -> Path:
    """`count` example images saved at `size` px (with their captions) in `folder`."""
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    for path in sorted(EXAMPLES.glob("*.png"))[:count]:
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(
                folder / path.name
            )
        (folder / path.with_suffix(".txt").name).write_text(path.with_suffix(".txt").read_text())
    return folder


def run_one(row: dict, work: Path) -> dict:
    """One training run in a fresh process; returns its run.json plus the row."""
    source = row.get("source", row["resolution"])
    data = make_images(work / f"data{source}", source)
    if row.get("reference"):
        return run_reference(row, data)
    out = work / row["name"].replace(" ", "_").replace("/", "_")
    overrides = [
        f"model.base={row['base']}",
        f"dataset.path={data}",
        "dataset.trigger=zkstripes",
        f"dataset.resolution={row['resolution']}",
        "dataset.buckets=false",
        f"dataset.flip={str(row.get('flip', False)).lower()}",
        f"dataset.cache_latents={str(row['cache']).lower()}",
        f"lora.text_encoder={str(row.get('text_encoder', True)).lower()}",
        f"train.steps={row['steps']}",
        f"train.batch_size={row['batch']}",
        f"train.gradient_checkpointing={str(row['gc']).lower()}",
        f"train.mixed_precision={row.get('precision', 'no')}",
        f"output.dir={out}",
        "sample.steps=1",
        # The comparison draws no samples: the diffusers loop has none (no validation prompt).
        "sample.prompts=[]" if "pair" in row else 'sample.prompts=["{trigger}"]',
        "sample.report_images=0",
    ]
    config = work / "empty.toml"
    config.write_text("")
    cmd = [sys.executable, "-m", "sdlora", "train", str(config), *overrides, "--no-progress"]
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        return {**row, "error": result.stderr.strip().splitlines()[-1]}
    report = json.loads((out / "run.json").read_text())
    return {**row, **report, "process_s": time.time() - started}


def run_reference(row: dict, data: Path) -> dict:
    """The rebuilt diffusers loop (reference_loop.py) in a fresh process."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "reference_loop.py"),
        str(data),
        f"--base={row['base']}",
        f"--resolution={row['resolution']}",
        f"--steps={row['steps']}",
        f"--batch={row['batch']}",
        f"--mixed-precision={row.get('precision', 'no')}",
    ]
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        return {**row, "error": result.stderr.strip().splitlines()[-1]}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {**row, **report, "process_s": time.time() - started}


def step_flops(base_spec: str, resolution: int, batch: int, device: str) -> float:
    """FLOPs of one UNet forward + backward with LoRA, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdlora.lora import UNET_ATTENTION, inject_lora
    from sdlora.models import load_base
    from sdlora.step import added_cond, diffusion_loss

    base = load_base(base_spec)
    inject_lora(base.unet, 16, 16, UNET_ATTENTION)
    base.unet.to(device)
    side = resolution // 8
    width = base.unet.config.cross_attention_dim
    latents = torch.randn(batch, 4, side, side, device=device)
    text = torch.randn(batch, 77, width, device=device)
    pooled = torch.randn(batch, 1280, device=device) if base.family == "sdxl" else None
    geometry = [(resolution, resolution, 0, 0, resolution, resolution)] * batch
    added = added_cond(base, pooled, geometry, device) if pooled is not None else None
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device, torch.bfloat16):
        loss = diffusion_loss(
            base.unet, base.scheduler, latents, text, torch.randn_like(latents), t, added
        )
        loss.backward()
    return float(counter.get_total_flops())


def rows(quick: bool, cuda: bool) -> list[dict]:
    plan = []
    for cache in (True, False):
        for gc in (False, True):
            plan.append(dict(name=f"tiny:sd1@64 cache={cache} gc={gc}", base="tiny:sd1",
                             resolution=64, batch=4, steps=40, cache=cache, gc=gc))  # fmt: skip
    if not quick:
        for cache in (True, False):
            for gc in (False, True):
                plan.append(dict(name=f"sd1.5-arch@256 cache={cache} gc={gc}", base="random:sd1",
                                 resolution=256, batch=1, steps=4, cache=cache, gc=gc))  # fmt: skip
    if cuda:
        for base, res in (("random:sd1", 512), ("random:sdxl", 1024)):
            for batch in (1, 4, 8):
                plan.append(dict(name=f"{base}@{res} bf16 b{batch}", base=base, resolution=res,
                                 batch=batch, steps=20, cache=True, gc=base == "random:sdxl",
                                 precision="bf16", flops=True))  # fmt: skip
    return plan


def comparison_rows(cuda: bool, steps: int) -> list[dict]:
    """sdlora and the rebuilt diffusers loop, same settings, in pairs (see `compare`)."""
    resolution, precisions = (512, ("bf16",)) if cuda else (256, ("no", "bf16"))
    plan = []
    for precision in precisions:
        for who in ("sdlora", "diffusers loop"):
            plan.append(dict(name=f"sd1.5-arch@{resolution} unet-only {precision}, {who}",
                             base="random:sd1", resolution=resolution, source=2 * resolution,
                             batch=1, steps=steps, cache=True, gc=False, flip=True,
                             text_encoder=False, precision=precision, pair=precision,
                             reference=who != "sdlora"))  # fmt: skip
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model rows only")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU")
    parser.add_argument("--compare-only", action="store_true", help="only sdlora vs diffusers")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA rows")
    parser.add_argument("--compare-steps", type=int, default=32, help="steps of each comparison")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    peak = args.peak_tflops
    if cuda and peak is None:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [] if args.compare_only else rows(args.quick, cuda)
        if args.cuda_only:
            if not cuda:
                raise SystemExit("--cuda-only: no CUDA device here")
            plan = [row for row in plan if row.get("flops")]
        elif not args.quick:
            plan += comparison_rows(cuda, args.compare_steps)
        for row in plan:
            result = run_one(row, Path(tmp))
            if row.get("flops") and "error" not in result:
                flops = step_flops(row["base"], row["resolution"], row["batch"], "cuda")
                per_s = result["samples_per_s"] / row["batch"] * flops
                result["tflops"] = per_s / 1e12
                result["mfu"] = per_s / (peak * 1e12) if peak else None
            results.append(result)
            print_row(result, header=len(results) == 1)
    compare(results)


def print_row(r: dict, header: bool) -> None:
    if header:
        head = ("setting", "batch", "samples/s", "peak MB", "TFLOP/s", "MFU")
        print("{:<48} {:>5} {:>10} {:>9} {:>8} {:>6}".format(*head))
    if "error" in r:
        print(f"{r['name']:<48} failed: {r['error']}", flush=True)
        return
    tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
    mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
    cells = (
        r["name"],
        r["batch"],
        f"{r['samples_per_s']:.3f}",
        f"{r['peak_memory_mb']:.0f}",
        tf,
        mfu,
    )
    print("{:<48} {:>5} {:>10} {:>9} {:>8} {:>6}".format(*cells), flush=True)


def compare(results: list[dict]) -> None:
    """sdlora against the rebuilt diffusers loop: ratios of time and memory (lower is better)."""
    pairs: dict[str, dict] = {}
    for r in results:
        if "pair" in r and "error" not in r:
            pairs.setdefault(r["pair"], {})["theirs" if r["reference"] else "ours"] = r
    for pair in pairs.values():
        if len(pair) < 2:
            continue
        ours, theirs = pair["ours"], pair["theirs"]
        loop = theirs["samples_per_s"] / ours["samples_per_s"]
        process = ours["process_s"] / theirs["process_s"]
        memory = ours["peak_memory_mb"] / theirs["peak_memory_mb"]
        print(f"\nsdlora / diffusers loop ({ours['name'].split(',')[0]}): loop time {loop:.2f}x, "
              f"process wall time {process:.2f}x (sdlora's includes caching every latent up "
              f"front), loop peak memory {memory:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
