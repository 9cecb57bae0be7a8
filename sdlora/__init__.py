"""sdlora: train Stable Diffusion style LoRAs (SD 1.x, SD 2.x, SDXL) that load everywhere."""

from sdlora.config import Config, load_config
from sdlora.errors import SdloraError
from sdlora.generate import LoraSpec, generate
from sdlora.train import TrainResult, train

__all__ = ["Config", "LoraSpec", "SdloraError", "TrainResult", "generate", "load_config", "train"]
__version__ = "0.1.0"
