"""The training run's configuration: one frozen dataclass per TOML section, each field with
its default and meaning, and the checks within a section (`__post_init__`).

A config file has one table per section below; `sdlora.configfile` reads it strictly (unknown
keys and wrong types rejected with the key named), applies `section.key=value` overrides and
writes the resolved config back.
"""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from sdlora.algos import ALGOS
from sdlora.decode import parse_colour
from sdlora.errors import SdloraError
from sdlora.families import BASE_LABELS, PREDICTION_TYPES, known_label, same_architecture

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
ATTENTIONS = ("sdpa", "xformers")
LR_SCHEDULERS = ("constant", "cosine", "cosine_with_restarts", "linear", "polynomial")
PRIOR_TARGETS = ("noise", "base")
UNET_TARGETS = ("attention", "attention+ff", "all-linear")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
CROPS = ("center", "random")
SMALL_IMAGES = ("skip", "upscale")
# output.name plus the longest suffix a run adds (`-step000001.safetensors`, 23 bytes) and a
# temporary-file tag stays under the 255-byte file-name limit of common file systems.
MAX_NAME_BYTES = 200
# Characters that reorder how a name is displayed (U+202E shows `exe.txt` as `txt.exe`).
BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
BASE_HINT = (
    'name the base checkpoint, e.g. model.base = "path/to/model.safetensors" (a single file, '
    "a diffusers folder or a hub id), or `micro` / `tiny:sd1` for a quick test"
)
DEFAULT_LR = 1e-4
# Prodigy estimates its own step size; lr multiplies it, and its authors use 1.
PRODIGY_LR = 1.0
LOSSES = ("mse", "huber", "smooth_l1")


@dataclass(frozen=True)
class ModelConfig:
    base: str = ""
    """Base checkpoint (required): diffusers folder, single-file .safetensors, hub id, `micro`
    or `tiny:<family>`."""
    family: str | None = None
    """Override the family recognised from the weights (sd1, sd2, sd2-v, sdxl); rarely needed."""
    config_dir: str | None = None
    """Local diffusers-layout config folder for a single-file checkpoint (default: built in)."""
    allow_pickle: bool = False
    """Allow a pickle `.ckpt` base (loaded with `weights_only=True`); prefer `.safetensors`."""
    base_label: str = ""
    """The base's name as people know it (`Pony`, `Illustrious`, `NoobAI`, `SD 1.5`): recorded
    in the LoRA and its bundle (Civitai's base model); empty: the family's name."""
    prediction_type: str | None = None
    """`epsilon` or `v_prediction`: what the base predicts, for a single file that cannot
    tell (an SDXL v-prediction fine-tune such as NoobAI-XL v-pred); unset: the base says."""

    def __post_init__(self):
        if not self.base:
            raise SdloraError(f"model.base is empty: {BASE_HINT}")
        label = known_label(self.family or "")
        if label:
            family = BASE_LABELS[label]
            raise SdloraError(
                f"model.family={self.family!r}: {label} is a base of family {family}; set "
                f'model.family={family} (or leave it out) and model.base_label="{label}"'
            )
        _check_choice("model.family", self.family, FAMILIES, optional=True)
        _check_choice(
            "model.prediction_type", self.prediction_type, PREDICTION_TYPES, optional=True
        )
        if self.prediction_type and self.family in ("sd2", "sd2-v"):
            wanted = "sd2-v" if self.prediction_type == "v_prediction" else "sd2"
            if wanted != self.family:
                raise SdloraError(
                    f"model.family={self.family} contradicts model.prediction_type="
                    f"{self.prediction_type}: for SD 2.x set model.family={wanted} or leave "
                    "one of them out"
                )
        label = known_label(self.base_label)
        if label and self.family and not same_architecture(BASE_LABELS[label], self.family):
            raise SdloraError(
                f"model.base_label={self.base_label!r} is a base of family {BASE_LABELS[label]} "
                f"but model.family is {self.family}; fix one of them"
            )


@dataclass(frozen=True)
class DatasetConfig:
    path: str = ""
    """Folder of training images, with optional `.txt` captions beside them."""
    trigger: str = ""
    """Trigger word put first in every caption that lacks it; written into the LoRA's metadata."""
    caption_ext: str = ".txt"
    """Extension of the caption sidecar files."""
    caption_template: str = "{trigger}"
    """Caption used for an image without a sidecar file; `{trigger}` is replaced."""
    resolution: int = 512
    """Training size: buckets have an area of about resolution² (sides multiples of 64)."""
    repeats: int = 0
    """Times each image appears per epoch; 0: about 100 images per epoch (`N_name` folders: N)."""
    buckets: bool = True
    """Aspect-ratio buckets; false trains resolution x resolution centre squares."""
    crop: str = "center"
    """Crop to the bucket: `center`, or `random` (new offset each draw; its latents not cached)."""
    flip: bool = False
    """Mirror images left-right at random (two cached latents per image)."""
    shuffle_tags: bool = False
    """Shuffle a caption's comma-separated tags every step (the first `keep_tokens` stay)."""
    keep_tokens: int = 1
    """Leading tags never shuffled or dropped (1 keeps the trigger word first)."""
    caption_dropout: float = 0.0
    """Chance that a step trains on an empty caption."""
    tag_dropout: float = 0.0
    """Chance that each tag after the first `keep_tokens` is left out of a step's caption."""
    background: str = "white"
    """Colour put under transparent pixels (a name or #rrggbb)."""
    small_images: str = "skip"
    """Images under half the resolution: `skip` or `upscale` (warned either way)."""
    max_pixels: int = 100_000_000
    """Pixel cap per image: larger files are skipped as possible decompression bombs."""
    cache_latents: bool = True
    """Encode each image with the VAE once (per bucket and flip) instead of every step."""
    cache_dir: str = ""
    """Folder keeping latents between runs (never inside dataset.path); empty: memory only."""
    follow_external_links: bool = False
    """Use symbolic links that lead outside dataset.path (never into /proc, /sys, /dev)."""
    validation_split: float = 0.0
    """Fraction of the images held out of training for the validation loss (0: none)."""
    validation_path: str = ""
    """Folder of validation images, scanned like dataset.path (instead of validation_split)."""

    def __post_init__(self):
        if not self.path:
            raise SdloraError("dataset.path is empty: set it to the folder of training images")
        if not self.trigger.strip():
            raise SdloraError("dataset.trigger is empty: pick a rare word such as `zkstyle`")
        if not self.caption_ext.startswith("."):
            raise SdloraError(f"dataset.caption_ext must start with '.', got {self.caption_ext!r}")
        # 32 suits the micro model (x4 VAE); SD bases need multiples of 64 (checked on load).
        if self.resolution < 32 or self.resolution % 32:
            raise SdloraError(
                f"dataset.resolution must be a multiple of 32 (64 for SD checkpoints), at least "
                f"32; got {self.resolution}"
            )
        if self.repeats < 0 or self.keep_tokens < 0:
            raise SdloraError(
                f"dataset.repeats and dataset.keep_tokens must be >= 0, got {self.repeats} "
                f"and {self.keep_tokens}"
            )
        for name in ("caption_dropout", "tag_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise SdloraError(f"dataset.{name} must be in [0, 1], got {getattr(self, name)}")
        _check_choice("dataset.crop", self.crop, CROPS)
        _check_choice("dataset.small_images", self.small_images, SMALL_IMAGES)
        _check_positive("dataset.max_pixels", self.max_pixels)
        try:
            parse_colour(self.background)
        except ValueError as e:
            raise SdloraError(f"dataset.background: {e}") from None
        if self.cache_dir and Path(self.cache_dir).resolve().is_relative_to(
            Path(self.path).resolve()
        ):
            raise SdloraError(
                f"dataset.cache_dir {self.cache_dir} is inside dataset.path; sdlora never "
                "writes into the dataset folder: choose a folder outside it"
            )
        self._check_validation()

    def _check_validation(self):
        if not 0 <= self.validation_split < 1:
            raise SdloraError(
                f"dataset.validation_split must be in [0, 1) (a fraction of the images), "
                f"got {self.validation_split}"
            )
        if self.validation_split and self.validation_path:
            raise SdloraError(
                "dataset.validation_split and dataset.validation_path are both set; "
                "hold out a fraction of dataset.path or name a folder, not both"
            )
        if self.validation_path and Path(self.validation_path).resolve().is_relative_to(
            Path(self.path).resolve()
        ):
            raise SdloraError(
                f"dataset.validation_path {self.validation_path} is inside dataset.path, so "
                "its images would be trained on; move it out or use dataset.validation_split"
            )


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    """Rank of the low-rank update (sd-scripts' `network_dim`)."""
    alpha: float | None = None
    """Scale numerator: the update is multiplied by alpha / rank (sd-scripts' `network_alpha`);
    unset: alpha = rank (scale 1, whatever the rank)."""
    unet_targets: str = "attention"
    """UNet modules to adapt: `attention` (q, k, v, out), `attention+ff`, `all-linear`."""
    text_encoder: bool = True
    """Also train a LoRA on the text encoder's attention (q, k, v, out projections)."""
    init_from: str | None = None
    """Start from this LoRA file (same rank and targets) instead of a fresh initialisation."""
    algo: str = "lora"
    """`lora`; `locon`: also the UNet's ResNet and resampler convolutions (LyCORIS's LoCon);
    `loha` (Hadamard product of two low-rank updates) or `lokr` (Kronecker product), on the
    same modules as `locon`."""
    conv_rank: int | None = None
    """Rank of the convolutions' update (`locon`, `loha`, `lokr`; unset: `rank`)."""
    conv_alpha: float | None = None
    """Alpha of the convolutions' update (`locon`, `loha`, `lokr`; unset: `conv_rank`)."""
    dora: bool = False
    """DoRA: also learn each adapted weight's magnitude per output channel (`lora`, `locon`)."""
    lokr_factor: int | None = None
    """`lokr`: split each dimension into a factor near this and the rest (LyCORIS's `factor`;
    unset: -1, as evenly as possible)."""
    lokr_decompose_both: bool | None = None
    """`lokr`: make the smaller Kronecker factor low-rank too (LyCORIS's `decompose_both`;
    unset: false)."""

    def __post_init__(self):
        _check_positive("lora.rank", self.rank)
        if self.alpha is None:  # resolved here, so the run's config.toml records the number
            object.__setattr__(self, "alpha", float(self.rank))
        _check_positive("lora.alpha", self.alpha)
        _check_choice("lora.unet_targets", self.unet_targets, UNET_TARGETS)
        _check_choice("lora.algo", self.algo, tuple(ALGOS))
        if not isinstance(self.dora, bool):
            raise SdloraError(f"lora.dora must be true or false, got {self.dora!r}")
        if self.dora and ALGOS[self.algo].module != "lora":
            raise SdloraError(
                f'lora.dora applies to lora.algo = "lora" or "locon", not "{self.algo}" '
                "(peft trains DoRA on LoRA layers only); drop lora.dora or change lora.algo"
            )
        self._check_lokr()
        if not ALGOS[self.algo].convs:
            for key in ("conv_rank", "conv_alpha"):
                if getattr(self, key) is not None:
                    raise SdloraError(
                        f"lora.{key} applies to convolutions, which lora.algo = "
                        f'"{self.algo}" does not adapt; set lora.algo = "locon" or drop lora.{key}'
                    )
            return
        if self.conv_rank is None:
            object.__setattr__(self, "conv_rank", self.rank)
        _check_positive("lora.conv_rank", self.conv_rank)
        if self.conv_alpha is None:
            object.__setattr__(self, "conv_alpha", float(self.conv_rank))
        _check_positive("lora.conv_alpha", self.conv_alpha)

    def _check_lokr(self) -> None:
        """LoKr's own keys: refused for other algos, resolved to LyCORIS's defaults for it."""
        keys = {"lokr_factor": -1, "lokr_decompose_both": False}
        if self.algo != "lokr":
            for key in keys:
                if getattr(self, key) is not None:
                    raise SdloraError(
                        f'lora.{key} applies to lora.algo = "lokr", not "{self.algo}"; '
                        f'set lora.algo = "lokr" or drop lora.{key}'
                    )
            return
        for key, default in keys.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        factor = self.lokr_factor
        if type(factor) is not int or not (factor == -1 or factor > 0):
            raise SdloraError(f"lora.lokr_factor must be -1 or a positive integer, got {factor!r}")
        if not isinstance(self.lokr_decompose_both, bool):
            raise SdloraError(
                f"lora.lokr_decompose_both must be true or false, got {self.lokr_decompose_both!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Number of optimizer steps (ignored when `epochs` is set)."""
    epochs: int | None = None
    """Train for this many passes over the dataset instead (steps = epochs x steps per epoch)."""
    batch_size: int = 1
    """Images per step."""
    lr: float | None = None
    """Learning rate of the UNet LoRA; unset: 1e-4, or 1 with `optimizer = "prodigy"`."""
    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA (defaults to `lr`)."""
    optimizer: str = "adamw"
    """`adamw`, `adamw8bit` (needs bitsandbytes) or `prodigy` (needs prodigyopt; lr 1)."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    lr_scheduler: str = "constant"
    """constant, cosine, cosine_with_restarts, linear or polynomial."""
    warmup_steps: int = 0
    """Linear warm-up steps at the start of the schedule."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    max_grad_norm: float = 1.0
    """Clip gradients to this norm (0 turns clipping off)."""
    mixed_precision: str = "no"
    """`no`, `fp16` (CUDA only) or `bf16`."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    seed: int = 0
    """Seed for LoRA initialisation, noise, timesteps and data order."""
    log_every: int = 1
    """Write the loss to the logs every N steps."""
    validate_every: int = 0
    """Validation loss every N steps, as well as at the start, each checkpoint and the end."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    attention: str = "sdpa"
    """`sdpa` (PyTorch's fused attention) or `xformers` (CUDA with xformers installed)."""
    min_snr_gamma: float | None = None
    """Min-SNR loss weighting with this gamma (5 is usual); unset: plain MSE."""
    noise_offset: float = 0.0
    """Offset noise strength (0.05-0.1 helps very dark or bright styles)."""
    loss: str = "mse"
    """`mse`, or `huber` / `smooth_l1` (pseudo-Huber: less pull from outliers) with `huber_c`."""
    huber_c: float = 0.1
    """Where the Huber losses turn from quadratic to linear (sd-scripts' default 0.1)."""
    debiased_estimation: bool = False
    """Weight each step's loss by 1/√SNR (v-prediction: 1/(SNR+1)), as sd-scripts: less of
    the fine detail of noise-free steps, more of composition and colour."""
    multires_noise_iterations: int = 0
    """Multi-resolution noise levels (sd-scripts' pyramid noise; 6-10 is usual; 0: off)."""
    multires_noise_discount: float = 0.3
    """Weight of each coarser level of multi-resolution noise relative to the one above."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the LoRA weights with this decay (0.999 is
    usual for 1000-3000 steps) and save it as the LoRA; unset: off."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero terminal SNR (Lin et al. 2023), for v-prediction
    bases trained that way (NoobAI-XL v-pred); samples then use trailing timesteps and
    rescaled guidance. A base whose scheduler config says so gets it without this."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none)."""
    keep_last: int = 2
    """How many checkpoints to keep (older ones are removed once a new one is complete)."""
    resume: str | None = None
    """`latest` (newest checkpoint in output.dir) or a checkpoints/step_NNNNNN folder."""
    prior_images: int = 0
    """Prior preservation: images the base draws for the captions without the trigger (0: off)."""
    prior_weight: float = 1.0
    """Weight of the loss on the prior-preservation images beside the style images' loss."""
    prior_target: str = "base"
    """What the LoRA fits on the prior images: `base` (the base model's own prediction for the
    same noisy image and caption, the adapters off: exactly "change nothing", with no noise in
    the target) or `noise` (DreamBooth: the noise added, as on the style images)."""
    prior_unconditional: float = 0.5
    """Share of the prior images fit under the empty prompt instead of their own caption: the
    unconditional prediction, which classifier-free guidance uses in every sample, with or
    without the trigger, then stays as the base has it too (0: never)."""
    clip_skip: int | None = None
    """Condition on the text encoder's N-th layer from the end, as A1111's "Clip skip" (2 for
    bases trained that way, e.g. anime SD 1.x models); SDXL always uses the penultimate layer."""
    log_with: tuple[str, ...] = ("tensorboard",)
    """accelerate trackers for the loss: `tensorboard`, `wandb`, ... (installed separately)."""

    def __post_init__(self):
        if self.lr is None:  # resolved here, so the run's config.toml records the number
            object.__setattr__(
                self, "lr", PRODIGY_LR if self.optimizer == "prodigy" else DEFAULT_LR
            )
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.epochs is not None:
            _check_positive("train.epochs", self.epochs)
        if self.min_snr_gamma is not None:
            _check_positive("train.min_snr_gamma", self.min_snr_gamma)
        if self.noise_offset < 0 or self.save_every < 0 or self.validate_every < 0:
            raise SdloraError(
                f"train.noise_offset, train.save_every and train.validate_every must be >= 0, "
                f"got {self.noise_offset}, {self.save_every} and {self.validate_every}"
            )
        _check_choice("train.attention", self.attention, ATTENTIONS)
        _check_choice("train.loss", self.loss, LOSSES)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise SdloraError(f"train.ema_decay must be between 0 and 1, got {self.ema_decay}")
        if self.multires_noise_iterations < 0 or not 0 < self.multires_noise_discount <= 1:
            raise SdloraError(
                "train.multires_noise_iterations must be >= 0 and multires_noise_discount in "
                f"(0, 1], got {self.multires_noise_iterations} and {self.multires_noise_discount}"
            )
        _check_positive("train.huber_c", self.huber_c)
        if self.prior_images < 0 or self.prior_weight < 0:
            raise SdloraError(
                f"train.prior_images and train.prior_weight must be >= 0, got "
                f"{self.prior_images} and {self.prior_weight}"
            )
        _check_positive("train.lr", self.lr)
        if self.text_encoder_lr is not None and self.text_encoder_lr < 0:
            raise SdloraError(f"train.text_encoder_lr must be >= 0, got {self.text_encoder_lr}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise SdloraError("train.warmup_steps, max_grad_norm and weight_decay must be >= 0")
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_choice("train.prior_target", self.prior_target, PRIOR_TARGETS)
        if not 0 <= self.prior_unconditional <= 1:
            raise SdloraError(
                f"train.prior_unconditional is a share of the prior images, between 0 and 1; "
                f"got {self.prior_unconditional}"
            )
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("train.device", self.device, DEVICES)
        if self.clip_skip is not None:
            _check_positive("train.clip_skip", self.clip_skip)
        if self.optimizer == "prodigy":
            rates = (("lr", self.lr), ("text_encoder_lr", self.text_encoder_lr))
            low = [f"train.{k}={v:g}" for k, v in rates if v is not None and 0 < v < 0.1]
            if low:
                warnings.warn(
                    f"{' and '.join(low)} with train.optimizer=prodigy: Prodigy finds its own "
                    "step size and the rate only scales it, so under 0.1 it barely learns; "
                    "use 1 (the default with prodigy)",
                    stacklevel=1,  # this file: cli.main prints it as sdlora's own warning
                )

    @property
    def te_lr(self) -> float:
        """The text-encoder LoRA's learning rate: `text_encoder_lr`, or `lr` when unset."""
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.lr


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/sdlora"
    """Run folder: the LoRA, samples, logs and the resolved config are written here."""
    name: str = "style"
    """File name of the LoRA, without `.safetensors`."""
    dtype: str = "fp16"
    """Precision of the saved LoRA: fp16 (what sd-scripts writes), bf16 or fp32."""
    overwrite: bool = False
    """Allow replacing a LoRA of the same name already in `dir`."""
    step_loras: bool = True
    """At each checkpoint (`train.save_every`) also write `<name>-stepNNNNNN.safetensors`, the
    LoRA as it is at that step, loadable like the final one."""
    bundle: bool = True
    """At the end, write `bundle/`: the LoRA ready to publish (see `sdlora bundle`)."""

    def __post_init__(self):
        check_file_name("output.name", self.name)
        _check_choice("output.dtype", self.dtype, SAVE_DTYPES)


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ("{trigger}",)
    """Prompts for sample grids; `{trigger}` is replaced by the trigger word. [] draws none."""
    every: int = 0
    """Sample every N steps as well as at the start and the end (0: start and end only)."""
    steps: int = 20
    """Denoising steps per sample."""
    cfg: float = 7.5
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the sample noise, the same at every sampling so grids compare."""
    report_images: int = 16
    """Images per set in the learning report (base / LoRA, with / without trigger); 0: none."""
    checkpoint_images: int = 4
    """Images per set for the style scores at each checkpoint (at most report_images; 0: none)."""

    def __post_init__(self):
        if self.every < 0:
            raise SdloraError(f"sample.every must be >= 0, got {self.every}")
        _check_positive("sample.steps", self.steps)
        for name in ("report_images", "checkpoint_images"):
            if getattr(self, name) < 0:
                raise SdloraError(f"sample.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Config:
    """A whole training run: one field per TOML section."""

    model: ModelConfig
    dataset: DatasetConfig
    lora: LoraConfig
    train: TrainConfig
    output: OutputConfig
    sample: SampleConfig


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "output": OutputConfig,
    "sample": SampleConfig,
}


def check_file_name(name: str, value: str) -> None:
    """Refuse a file name that cannot be written, or reads as something it is not."""
    problem, size = None, len(value.encode("utf-8", "surrogatepass"))
    if not value or value in (".", ".."):
        problem = "is empty" if not value else "is not a file name"
    elif "/" in value or "\\" in value:
        problem = "contains a path separator (/ or \\)"
    elif any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        problem = "contains a control character (newline, tab, NUL, ...)"
    elif any(c in BIDI_CONTROLS for c in value):
        problem = "contains a text-direction control character (such as U+202E)"
    elif size > MAX_NAME_BYTES:
        problem = (
            f"is {size} bytes long in UTF-8; at most {MAX_NAME_BYTES}, so "
            "`<name>-stepNNNNNN.safetensors` fits a file name"
        )
    if problem:
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise SdloraError(f"{name} {problem}: {shown!r}; choose a plain file name")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SdloraError(f"{name} must be > 0, got {value}")


def _check_choice(name: str, value: str | None, choices: tuple[str, ...], optional=False) -> None:
    if value is None and optional:
        return
    if value not in choices:
        raise SdloraError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
