"""sdlora: train Stable Diffusion style LoRAs (SD 1.x, SD 2.x, SDXL) that load everywhere."""

import logging

# diffusers' pipelines import CLIP's image processor (for a safety checker sdlora never loads);
# without torchvision, transformers warns about it on every command. Only that one is muted.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

from sdlora.config import Config, load_config  # noqa: E402
from sdlora.errors import SdloraError  # noqa: E402
from sdlora.generate import LoraSpec, generate  # noqa: E402
from sdlora.train import TrainResult, train  # noqa: E402

__all__ = ["Config", "LoraSpec", "SdloraError", "TrainResult", "generate", "load_config", "train"]
__version__ = "0.1.0"
