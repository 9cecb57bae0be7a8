"""Loading a base model: diffusers folder, single-file checkpoint, hub id or a built-in tiny model.

Every loader returns one `Base` record: the pipeline components plus the family they belong to.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdlora import micro, tiny
from sdlora.errors import SdloraError
from sdlora.families import (
    FAMILIES,
    Detection,
    family_from_diffusers_config,
    family_from_width,
)
from sdlora.schedule import prediction_from_metadata, with_schedule
from sdlora.stfile import PICKLE_SUFFIXES, load_state_dict, read_safetensors_header

TINY_PREFIX = "tiny:"
RANDOM_PREFIX = "random:"
MICRO = "micro"
CONFIGS = Path(__file__).resolve().parent / "model_configs"
CONFIG_FOLDERS = {"sd1": "sd15", "sd2": "sd21-base", "sd2-v": "sd21-768-v", "sdxl": "sdxl-base"}


@dataclass
class Base:
    """A frozen base checkpoint, ready to train on or generate with."""

    name: str
    family: str
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler: object
    """The training noise scheduler (DDPM with the checkpoint's schedule and prediction type)."""
    text_encoder_2: object | None = None
    tokenizer_2: object | None = None
    prediction_stated: bool = True
    """False when nothing said the prediction type (a single file without ModelSpec metadata):
    it is then the family's usual one, and a LoRA's metadata may say better."""

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def text_encoders(self) -> dict:
        """Text encoders by component name (`text_encoder`, and `text_encoder_2` for SDXL)."""
        encoders = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = self.text_encoder_2
        return encoders

    def pipeline(self, scheduler=None) -> DiffusionPipeline:
        """A diffusers pipeline over these very modules (LoRA layers included)."""
        scheduler = scheduler or self.scheduler
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def load_base(
    spec: str,
    family: str | None = None,
    seed: int = 0,
    config_dir: str | Path | None = None,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
) -> Base:
    """Load the base named by `spec`: `tiny:<family>`, a diffusers folder, a single-file
    checkpoint (`.safetensors`, or `.ckpt` with `allow_pickle`) or a hub id.

    `family` overrides what the weights say (only sd2 vs sd2-v cannot be told from shapes).
    `config_dir` replaces the built-in config folder a single-file checkpoint is read with.
    `prediction_type` (epsilon, v_prediction) overrides what the base says of itself, and
    `zero_terminal_snr` rescales its noise schedule (see `sdlora.schedule`).
    """
    base = _load(spec, family, seed, config_dir, allow_pickle)
    if prediction_type is not None or zero_terminal_snr:
        set_schedule(base, prediction_type, zero_terminal_snr)
    return base


def set_schedule(base: Base, prediction_type: str | None, zero_terminal_snr: bool) -> None:
    """Give `base` this prediction type (None: keep its own) and, if asked, zero terminal SNR.
    SD 2.x's family follows the prediction type (sd2 is epsilon, sd2-v v-prediction)."""
    base.scheduler = with_schedule(base.scheduler.config, prediction_type, zero_terminal_snr)
    if prediction_type is not None:
        base.prediction_stated = True
        if base.family in ("sd2", "sd2-v"):
            base.family = "sd2-v" if prediction_type == "v_prediction" else "sd2"


def _load(spec: str, family, seed: int, config_dir, allow_pickle: bool) -> Base:
    if spec == MICRO:
        return _from_micro(family)
    if spec.startswith(TINY_PREFIX):
        name = spec[len(TINY_PREFIX) :]
        if name not in tiny.TINY_FAMILIES:
            raise SdloraError(
                f"unknown built-in model {spec!r}; choose one of "
                + ", ".join(TINY_PREFIX + f for f in tiny.TINY_FAMILIES)
            )
        return Base(name=spec, family=name, **tiny.tiny_components(name, seed=seed))
    if spec.startswith(RANDOM_PREFIX):
        return random_base(spec[len(RANDOM_PREFIX) :], seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path, family)
    if path.is_file():
        return _from_single_file(path, family, config_dir, allow_pickle)
    if _looks_like_hub_id(spec):
        return _from_hub(spec, family)
    raise SdloraError(
        f"base {spec!r} does not exist: pass a diffusers folder, a .safetensors checkpoint, "
        "a hub id (org/name) or a built-in model such as tiny:sd1"
    )


def base_family(spec: str, family: str | None = None) -> str:
    """The family of a base without loading its weights (configs or the file header only)."""
    if family:
        return family
    for prefix in (TINY_PREFIX, RANDOM_PREFIX):
        if spec.startswith(prefix):
            return spec[len(prefix) :]
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        unet = json.loads((path / "unet" / "config.json").read_text())
        sched = path / "scheduler" / "scheduler_config.json"
        prediction = (
            json.loads(sched.read_text()).get("prediction_type", "epsilon")
            if sched.is_file()
            else "epsilon"
        )
        return family_from_diffusers_config(unet, (path / "text_encoder_2").is_dir(), prediction)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return checkpoint_family(path).family
    return load_base(spec).family


def checkpoint_family(path: Path) -> Detection:
    """Family of a single-file checkpoint (original SAI/LDM layout) from its header alone."""
    header, metadata = read_safetensors_header(path)
    keys = list(header)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k for k in keys[:50]):
        raise SdloraError(f"{path} is a LoRA, not a base model; pass it with --lora")
    to_k = next((k for k in keys if re.search(r"attn2\.to_k\.weight$", k)), None)
    if to_k is None:
        raise SdloraError(
            f"{path} does not look like a Stable Diffusion checkpoint (no cross-attention weights)"
        )
    width = header[to_k]["shape"][1]
    evidence = [f"cross-attention width {width}"]
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return Detection("sdxl", evidence + ["two text encoders"])
    prediction = "v_prediction" if metadata.get("modelspec.prediction_type") == "v" else "epsilon"
    found = family_from_width(width, prediction)
    if found is None:
        raise SdloraError(
            f"{path}: cross-attention width {width} matches no Stable Diffusion family; "
            "set model.family"
        )
    # SD 2.x 512 and 768-v differ only in prediction type, which a header rarely states.
    return Detection(found, evidence, ambiguous=found.startswith("sd2") and not metadata)


def random_base(family: str, seed: int = 0) -> Base:
    """A real-architecture base of `family` with random weights (`random:sd1`, ...), built from
    the shipped config folders: for benchmarks and shape tests, not for pictures."""
    if family not in CONFIG_FOLDERS:
        raise SdloraError(
            f"unknown family {family!r} for random:; choose one of {', '.join(CONFIG_FOLDERS)}"
        )
    folder = config_folder(family)
    encoders = {"text_encoder": CLIPTextModel}
    if family == "sdxl":
        encoders["text_encoder_2"] = CLIPTextModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        }
        for name, cls in encoders.items():
            parts[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
    for name in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        parts[name] = CLIPTokenizer.from_pretrained(folder / name)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched["prediction_type"] = FAMILIES[family].prediction_type
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return Base(
        name=RANDOM_PREFIX + family,
        family=family,
        scheduler=DDPMScheduler.from_config(sched),
        **parts,
    )


def config_folder(family: str) -> Path:
    """The built-in diffusers-layout config folder (configs + tokenizers) of `family`."""
    return CONFIGS / CONFIG_FOLDERS[family]


def _from_folder(path: Path, family: str | None) -> Base:
    index = path / "model_index.json"
    if not index.is_file():
        raise SdloraError(
            f"{path} is not a diffusers model folder (no model_index.json); pass the folder "
            "that holds unet/, vae/, text_encoder/ and model_index.json"
        )
    has_te2 = "text_encoder_2" in json.loads(index.read_text())
    cls = StableDiffusionXLPipeline if has_te2 else StableDiffusionPipeline
    extra = {} if has_te2 else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(path, dtype=torch.float32, local_files_only=True, **extra)
    except (OSError, ValueError) as e:
        raise SdloraError(f"could not load the diffusers folder {path}: {e}") from None
    return _from_pipeline(str(path), pipe, family)


def _from_single_file(path: Path, family: str | None, config_dir, allow_pickle: bool) -> Base:
    stated = None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        load_state_dict(path, allow_pickle)  # refuses unless allowed; checks it unpickles safely
        if family is None:
            raise SdloraError(
                f"{path} is a pickle checkpoint: set model.family (sd1, sd2, sd2-v, sdxl)"
            )
    else:
        detection = checkpoint_family(path)
        if detection.ambiguous and family is None:
            warnings.warn(
                f"{path}: SD 2.x checkpoint of unknown prediction type; assuming 512 epsilon "
                "(set model.family=sd2-v for the 768 v-prediction model)",
                stacklevel=2,
            )
        family = family or detection.family
        stated = prediction_from_metadata(read_safetensors_header(path)[1])
    config = Path(config_dir) if config_dir else config_folder(family)
    if not (config / "model_index.json").is_file():
        raise SdloraError(f"config folder {config} has no model_index.json")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(
            str(path), config=str(config), dtype=torch.float32, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SdloraError(
            f"could not load the checkpoint {path} with configs {config}: {e}"
        ) from None
    base = _from_pipeline(str(path), pipe, family, stated)
    # Only SD 2.x's family says its prediction type; SD 1.x and SDXL v-prediction fine-tunes
    # (NoobAI-XL v-pred) look like any other without metadata (or model.prediction_type).
    base.prediction_stated = stated is not None or family in ("sd2", "sd2-v")
    return base


def _from_micro(family: str | None) -> Base:
    """The pretrained micro model shipped inside the package (see `sdlora/micro.py`)."""
    if not micro.available():
        raise SdloraError(
            f"the micro model's weights are missing from {micro.WEIGHTS}; reinstall sdlora "
            "or rebuild them with scripts/pretrain_micro.py"
        )
    # Stored in fp16 to stay small; trained and sampled in fp32.
    pipe = StableDiffusionPipeline.from_pretrained(
        micro.WEIGHTS,
        dtype=torch.float32,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    return _from_pipeline(MICRO, pipe, family)


def _from_hub(repo_id: str, family: str | None) -> Base:
    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=torch.float32)
    except OSError as e:
        raise SdloraError(
            f"could not fetch {repo_id!r} from the hub ({e.__class__.__name__}); offline, "
            "download it elsewhere and pass the local folder or .safetensors file"
        ) from None
    return _from_pipeline(repo_id, pipe, family)


def _from_pipeline(
    name: str, pipe: DiffusionPipeline, family: str | None, prediction: str | None = None
) -> Base:
    """The Base of a loaded pipeline; `prediction` is what a single file's metadata states
    (the built-in scheduler config it was read with knows nothing of that file)."""
    parts = pipe.components
    sched_config = dict(parts["scheduler"].config)
    detected = family_from_diffusers_config(
        parts["unet"].config,
        parts.get("text_encoder_2") is not None,
        sched_config.get("prediction_type", "epsilon"),
    )
    family = family or detected
    if family not in FAMILIES:
        raise SdloraError(
            f"could not tell which Stable Diffusion family {name} belongs to; "
            "set model.family to sd1, sd2, sd2-v or sdxl"
        )
    if family in ("sd2", "sd2-v"):  # the family is the prediction type
        sched_config["prediction_type"] = FAMILIES[family].prediction_type
    elif prediction is not None:
        sched_config["prediction_type"] = prediction
    components = {
        key: parts.get(key)
        for key in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    }
    return Base(name=name, family=family, scheduler=with_schedule(sched_config), **components)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
