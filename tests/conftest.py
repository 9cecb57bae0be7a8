"""Shared fixtures: a small copy of the example set and one short training run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "datasets_examples" / "stripes"


@pytest.fixture()
def style_dir(tmp_path) -> Path:
    """Six images of the example style set with their captions, in a folder of their own."""
    folder = tmp_path / "style"
    folder.mkdir()
    for image in sorted(EXAMPLES.glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder


def tiny_overrides(dataset: Path, out: Path, steps: int = 3) -> list[str]:
    return [
        "model.base=tiny:sd1",
        f"dataset.path={dataset}",
        "dataset.trigger=zkstripes",
        "dataset.resolution=64",
        f"output.dir={out}",
        "output.name=style",
        f"train.steps={steps}",
        "train.batch_size=2",
        "train.lr=1e-2",
        "lora.rank=4",
        "lora.alpha=2",
        "sample.steps=2",
        "sample.report_images=2",
        'sample.prompts=["{trigger}, a circle"]',
        "output.bundle=false",  # the tests of the bundle turn it on
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One 3-step run on tiny:sd1 saved in fp32, shared by the tests that read its outputs."""
    from sdlora import load_config, train

    root = tmp_path_factory.mktemp("trained")
    folder = root / "style"
    folder.mkdir()
    for image in sorted(EXAMPLES.glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    config = load_config(None, tiny_overrides(folder, root / "run") + ["output.dtype=fp32"])
    return train(config, progress=False)


def random_lora(family: str = "sd1", rank: int = 4, alpha: float = 2.0, std: float = 0.1, seed=0):
    """A LoRA on tiny:<family>'s UNet and text-encoder attention, its up matrices drawn at
    random (with std 0, the zeros of a fresh LoRA), in the canonical form."""
    from sdlora import lora
    from sdlora.models import load_base

    return lora.random_lora(load_base(f"tiny:{family}"), rank, alpha, std, seed)


def unet_output(unet):
    """The UNet's output on fixed inputs (SDXL's added conditioning included), in float32."""
    import torch

    config = unet.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, config.cross_attention_dim, generator=g)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }
    with torch.no_grad():
        return unet.eval()(
            latents, torch.tensor([400]), text, added_cond_kwargs=added
        ).sample.float()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of micro-model work: its tensors are small, more threads only wait on each
    other. Used by a module with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
