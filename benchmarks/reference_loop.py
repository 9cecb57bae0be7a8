"""The training loop of diffusers' `examples/text_to_image/train_text_to_image_lora.py`,
rebuilt step for step as the baseline `train_speed.py` compares sdlora with.

That script cannot run on this machine as it is (it imports torchvision, which does not
install beside this torch, and it reads datasets through `datasets`), so this file does the
same work per step with the same libraries:
- the base's UNet, VAE and text encoder stored in the mixed-precision dtype on the device;
- a peft LoRA (`unet.add_adapter`, rank = alpha, Gaussian init) on to_q/to_k/to_v/to_out.0
  (cast to float32 under fp16, left in bf16 under bf16); AdamW (weight decay 1e-2) on the
  LoRA parameters;
- every step: each image of the batch read from disk, resized (shorter side to the
  resolution, bilinear), centre-cropped, randomly flipped and normalised, as its torchvision
  transforms do; its caption tokenized; the VAE encodes the pixels (a posterior sample, times
  the scaling factor); the text encoder encodes the ids; noise, timesteps, the UNet under
  autocast, an MSE loss in float32, backward, gradient clipping at 1.0, optimizer and
  schedule steps.

It prints one JSON line: steps, wall time of the loop, samples/s and the loop's peak memory
(measured as `sdlora.runtime.PeakMemory` measures sdlora's). Run it as
`python benchmarks/reference_loop.py DATA_DIR --base random:sd1 --resolution 256 --steps 4`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image

from sdlora.models import load_base
from sdlora.runtime import HALF_DTYPES, PeakMemory

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def pixels(path: Path, resolution: int, flip: bool) -> torch.Tensor:
    """Resize (shorter side), centre crop, flip, [-1, 1]: (3, resolution, resolution)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2 - 1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--base", default="random:sd1")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    weight_dtype = HALF_DTYPES.get(args.mixed_precision, torch.float32)
    base = load_base(args.base, seed=args.seed)
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.to(device, dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)  # under bf16 the script leaves them
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=1e-2)
    schedule = get_scheduler("constant", optimizer, num_training_steps=args.steps)
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)

    files = sorted(f for f in args.data.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    captions = {f: f.with_suffix(".txt").read_text().strip() for f in files}
    rng = random.Random(args.seed)
    order = []

    peak = PeakMemory(device)
    started = time.time()
    unet.train()
    for _ in range(args.steps):
        batch = []
        for _ in range(args.batch):
            if not order:
                order = files[:]
                rng.shuffle(order)
            batch.append(order.pop())
        px = torch.stack([pixels(f, args.resolution, rng.random() < 0.5) for f in batch])
        ids = base.tokenizer(
            [captions[f] for f in batch],
            padding="max_length",
            truncation=True,
            max_length=base.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            latents = vae.encode(px.to(device, weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            text = text_encoder(ids.to(device), return_dict=False)[0]
        noise = torch.randn_like(latents)
        steps = base.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(batch),), device=device).long()
        noisy = base.scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(lora_params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    wall = time.time() - started
    report = {
        "steps": args.steps,
        "wall_time_s": round(wall, 3),
        "samples_per_s": round(args.steps * args.batch / wall, 3),
        "peak_memory_mb": peak.megabytes(),
        "final_loss": loss.item(),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
