"""Pretrain the micro model shipped in `sdlora/weights/micro/` (see `sdlora/micro.py`).

The data is drawn by `sdlora/shapes.py` (nothing is downloaded). Two phases:
1. the VAE alone (MSE + a small KL term), on the shapes images and as many `texture_image`s:
   bands at any angle and width, gradients and shapes in random colours. A VAE that has only
   seen six flat colours cannot encode anything else, and a style LoRA could then learn nothing
   the VAE does not already draw. Its latent scaling factor is set to 1 / std of the latents,
   as SD's 0.18215 was;
2. the UNet and the text encoder together, from scratch, on the VAE's latents (epsilon
   prediction, SD's scaled-linear DDPM schedule), with captions that leave out the position
   or the background at random and are dropped entirely 10% of the time, so classifier-free
   guidance works. An exponential moving average of the weights is what gets saved.

Where the shape goes is the hard part. The colours can be read from the prompt at every
latent cell alike, but "on the left" means something else in each column, and a UNet only
knows where a cell is from its zero padding. Trained the plain way, the model learns to take
the layout from the starting noise instead (at SD's last timestep the latents still carry 7%
of the image) and ignores the position words: the first shipped weights drew the same places
for "left", "middle" and "right" from the same seed. Two things fix it:
- `--max-weight 20` weighs each sample's loss by min(1 / alpha_bar(t), 20): the noisiest
  steps, where the layout is decided and an error costs little in plain epsilon loss, count
  up to 20 times more;
- `--position-warmup 600`: the first 600 steps show one red square on blue at the three
  places, so the position words are all there is to learn; the full world follows, and the
  positions stay learnt.
That weighting blurs the edges a little (squares and triangles come out rounded), so the
shipped weights end with 2500 steps of plain loss (`--max-weight 1`).

The shipped weights, from the VAE of an earlier run (phase 1 with the defaults) and about an
hour of UNet training at one thread (the last phase at two) on a shared two-core machine:

    nice -n 10 .venv/bin/python scripts/pretrain_micro.py --work runs/pre --out runs/pre/final
    nice -n 10 .venv/bin/python scripts/pretrain_micro.py --work runs/pre2 --reuse-vae \
        --resume runs/pre/final --out runs/pre2/final --unet-steps 1500 --lr 3e-4 \
        --warmup 50 --max-weight 1 --position-warmup 0 --checkpoint-every 250
    nice -n 10 .venv/bin/python scripts/pretrain_micro.py --work runs/pre3 --reuse-vae \
        --resume runs/pre2/final --unet-steps 1000 --lr 2e-4 --warmup 20 --max-weight 1 \
        --position-warmup 0 --checkpoint-every 250

(the first: VAE 1200 steps, then 3000 UNet steps of 64 with the two fixes above, which are
the defaults; the last writes `sdlora/weights/micro/`; `--reuse-vae` reads `<work>/vae/`, so
copy `runs/pre/vae` into the later work folders).

Every `--checkpoint-every` steps the current EMA weights are written to
`<work>/checkpoints/step_NNNNN/` and scored with the pixel checker of `sdlora/shapes.py` (log
in `<work>/log.jsonl`; `scripts/pretrain_micro_log.jsonl` is the shipped weights' log).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextModel

from sdlora import micro, shapes

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=micro.WEIGHTS, help="final diffusers folder")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "pretrain_micro")
    p.add_argument("--images", type=int, default=12000, help="size of the drawn training set")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=6e-4, help="UNet and text-encoder peak rate")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--drop-position", type=float, default=0.3, help="captions without position")
    p.add_argument("--drop-background", type=float, default=0.3, help="... without background")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument(
        "--max-weight",
        type=float,
        default=20.0,
        help="weigh each sample's loss by min(1 / alpha_bar(t), this): above 1, the noisiest "
        "steps, where the layout (the shape's position) is decided, count more",
    )
    p.add_argument(
        "--position-warmup",
        type=int,
        default=600,
        help="first train this many steps on one colour, shape and background, so that the "
        "position words are all there is to learn",
    )
    p.add_argument("--checkpoint-every", type=int, default=300)
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of the scoring samples")
    p.add_argument("--reuse-vae", action="store_true", help="load <work>/vae instead of phase 1")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="start phase 2 from the UNet and text encoder of this diffusers folder (a checkpoint)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def draw_dataset(count: int, seed: int) -> tuple[list[shapes.Scene], torch.Tensor]:
    """`count` random scenes and their images as (N, 3, 32, 32) floats in [-1, 1]."""
    rng = random.Random(seed)
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    return scenes, to_tensor([shapes.draw(s, rng) for s in scenes])


def texture_image(rng: np.random.Generator) -> Image.Image:
    """A 32 px picture in random colours: bands (any angle, 3-16 px wide) or a gradient, with
    up to three random shapes on top."""
    side = shapes.SIZE * shapes.SUPERSAMPLE
    y, x = np.mgrid[0:side, 0:side] / shapes.SUPERSAMPLE  # in output pixels
    colours = rng.integers(0, 256, (rng.integers(2, 5), 3))
    if rng.random() < 0.6:
        angle = rng.uniform(0, np.pi)
        width = rng.uniform(3, 16)
        t = (x * np.cos(angle) + y * np.sin(angle)) / width + rng.uniform(0, 10)
        pixels = colours[np.floor(t).astype(int) % len(colours)]
    else:
        w = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / shapes.SIZE
        w = ((w - w.min()) / max(np.ptp(w), 1e-6))[..., None]
        pixels = colours[0] * (1 - w) + colours[1] * w
    image = Image.fromarray(pixels.astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, side, 2)
        r = rng.uniform(2, 10) * shapes.SUPERSAMPLE
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif kind == 1:
            pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image.resize((shapes.SIZE, shapes.SIZE), Image.Resampling.BOX)


def to_tensor(pictures: list) -> torch.Tensor:
    """PIL images or uint8 arrays -> (N, 3, H, W) floats in [-1, 1]."""
    pixels = np.stack([np.asarray(p) for p in pictures])  # (N, H, W, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, images: torch.Tensor, steps: int, lr: float, batch: int, log) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            # PSNR of images in [-1, 1]: peak-to-peak 2.
            log({"phase": "vae", "step": step, "mse": mse.item(), "psnr": psnr(mse.item())})
    vae.eval()


def psnr(mse: float) -> float:
    return 10 * math.log10(4 / max(mse, 1e-12))


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior means, (N, 4, 8, 8), unscaled."""
    return torch.cat([vae.encode(x).latent_dist.mean for x in images.split(256)])


def caption_ids(tokenizer, scenes, rng: random.Random, args, drop_position=None) -> torch.Tensor:
    drop_position = args.drop_position if drop_position is None else drop_position
    captions = [
        ""
        if rng.random() < args.caption_dropout
        else shapes.partial(s, rng, drop_position, args.drop_background).caption()
        for s in scenes
    ]
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def save(components: dict, folder: Path) -> None:
    """Write a diffusers folder with fp16 weights (half the size; loaded back as fp32)."""
    parts = dict(components)
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = copy.deepcopy(parts[name]).half()
    micro.pipeline(parts).save_pretrained(folder, safe_serialization=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "log.jsonl").open("a", encoding="utf-8")
    started = time.time()

    def log(record: dict) -> None:
        record = {"t": round(time.time() - started, 1), **record}
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    log({"settings": {k: str(v) for k, v in vars(args).items()}})
    parts = micro.fresh_components(args.seed)
    scenes, images = draw_dataset(args.images, args.seed)

    # Phase 1: the VAE, then its latent scale.
    vae_dir = args.work / "vae"
    if args.reuse_vae:
        parts["vae"] = type(parts["vae"]).from_pretrained(vae_dir)
    else:
        texture_rng = np.random.default_rng(args.seed)
        textures = to_tensor([texture_image(texture_rng) for _ in range(args.images)])
        vae_images = torch.cat([images, textures])
        train_vae(parts["vae"], vae_images, args.vae_steps, args.vae_lr, args.batch, log)
        raw = encode(parts["vae"], images)
        parts["vae"].register_to_config(scaling_factor=float(1 / raw.std()))
        parts["vae"].save_pretrained(vae_dir)
    vae = parts["vae"].eval().requires_grad_(False)
    latents = encode(vae, images) * vae.config.scaling_factor  # (N, 4, 8, 8)
    if args.position_warmup:
        warm_rng = random.Random(args.seed + 3)
        warm_scenes = [
            shapes.Scene("red", "square", warm_rng.choice(list(shapes.POSITIONS)), "blue")
            for _ in range(2000)
        ]
        warm_images = to_tensor([shapes.draw(w, warm_rng) for w in warm_scenes])
        warm_latents = encode(vae, warm_images) * vae.config.scaling_factor
    log({"phase": "vae", "scaling_factor": vae.config.scaling_factor})

    # Phase 2: UNet and text encoder together.
    if args.resume:
        parts["unet"] = UNet2DConditionModel.from_pretrained(args.resume / "unet").float()
        parts["text_encoder"] = CLIPTextModel.from_pretrained(args.resume / "text_encoder").float()
        log({"phase": "unet", "resumed_from": str(args.resume)})
    unet, te, tok, sched = (
        parts["unet"],
        parts["text_encoder"],
        parts["tokenizer"],
        parts["scheduler"],
    )
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "te": copy.deepcopy(te)}
    ema["te"].requires_grad_(False)
    params = [*unet.parameters(), *te.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    total = args.unet_steps

    def rate(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * (step - args.warmup) / max(1, total - args.warmup))
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    rng = random.Random(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    unet.train()
    te.train()
    result = {}
    for step in range(1, total + 1):
        if step <= args.position_warmup:
            idx = torch.randint(0, len(warm_scenes), (args.batch,), generator=gen)
            ids = caption_ids(tok, [warm_scenes[i] for i in idx.tolist()], rng, args, 0.0)
            x0 = warm_latents[idx]
        else:
            idx = torch.randint(0, len(scenes), (args.batch,), generator=gen)
            ids = caption_ids(tok, [scenes[i] for i in idx.tolist()], rng, args)
            x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t, te(ids)[0]).sample
        weight = (1 / sched.alphas_cumprod[t]).clamp(max=args.max_weight)
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema["unet"], unet, decay)
        ema_update(ema["te"], te, decay)
        if step % 50 == 0:
            log(
                {
                    "phase": "unet",
                    "step": step,
                    "loss": loss.item(),
                    "lr": schedule.get_last_lr()[0],
                }
            )
        if step % args.checkpoint_every == 0 or step == total:
            final = {**parts, "unet": ema["unet"], "text_encoder": ema["te"]}
            save(final, args.work / "checkpoints" / f"step_{step:05d}")
            overall, per_claim, _ = micro.agreement(
                micro.pipeline({**final, "scheduler": micro.scheduler()}),
                shapes.check_prompts(args.eval_prompts, seed=123),
                steps=args.eval_steps,
            )
            result = {"phase": "eval", "step": step, "agreement": overall, **per_claim}
            log(result)
    save({**parts, "unet": ema["unet"], "text_encoder": ema["te"]}, args.out)
    log({"done": str(args.out), "wall_s": round(time.time() - started, 1)})
    return result


if __name__ == "__main__":
    main()
