"""sdlora: train Stable Diffusion style LoRAs (SD 1.x, SD 2.x, SDXL) that load everywhere."""

import logging
import warnings

# diffusers' pipelines import CLIP's image processor (for a safety checker sdlora never loads);
# without torchvision, transformers warns about it on every command. Only that one is muted.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
# diffusers warns at every `.to(dtype)` that some modules "should be kept in float32", also
# when it lists none; only that empty-list form is muted.
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage()
)
# runtime.py turns on the text encoders' checkpointing by the name the whole supported
# transformers range knows; recent releases call that name deprecated.
warnings.filterwarnings(
    "ignore", r"`gradient_checkpointing_enable` is deprecated", FutureWarning, "transformers"
)

from sdlora.config import Config  # noqa: E402
from sdlora.configfile import load_config  # noqa: E402
from sdlora.errors import SdloraError  # noqa: E402
from sdlora.generate import generate  # noqa: E402
from sdlora.prompts import LoraSpec  # noqa: E402
from sdlora.train import TrainResult, train  # noqa: E402

__all__ = ["Config", "LoraSpec", "SdloraError", "TrainResult", "generate", "load_config", "train"]
__version__ = "0.1.0"
