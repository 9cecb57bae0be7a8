"""What a training run needs from the machine: optimizers, memory settings, processes."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import tempfile
import weakref
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from peft.helpers import disable_input_dtype_casting
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.errors import SdloraError
from sdlora.models import Base

# sd-scripts records the optimizer's class path in `ss_optimizer`.
OPTIMIZER_NAMES = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "prodigy": "prodigyopt.Prodigy",
}


def make_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names; the optional ones say how to install them."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SdloraError(
                "train.optimizer=adamw8bit needs bitsandbytes (CUDA): pip install bitsandbytes"
            ) from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise SdloraError(
            "train.optimizer=prodigy needs prodigyopt: pip install prodigyopt"
        ) from None
    return Prodigy(groups, weight_decay=weight_decay)


def configure_memory(base: Base, c_train, device: torch.device) -> None:
    """Gradient checkpointing and the attention kernel, as the config asks."""
    if c_train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in base.text_encoders.values():
            encoder.gradient_checkpointing_enable({"use_reentrant": False})
    if c_train.attention == "xformers":
        if device.type != "cuda":
            raise SdloraError("train.attention=xformers needs a CUDA device; use sdpa")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise SdloraError(
                "train.attention=xformers but xformers is not installed: "
                "pip install 'sdlora[xformers]', or use sdpa"
            ) from None
        base.unet.enable_xformers_memory_efficient_attention()


def make_accelerator(
    mixed_precision: str, device: str, run_dir: Path, log_with: tuple[str, ...] = ("tensorboard",)
) -> Accelerator:
    """accelerate's Accelerator for one run, logging to `log_with` trackers under
    `run_dir/logs` (TensorBoard by default).

    accelerate keeps its settings process-wide and refuses a second Accelerator with another
    precision, so a notebook could train only once; they are reset here (the process group of
    an `accelerate launch` with several processes is kept).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SdloraError("train.device is cuda but no CUDA device is available; use cpu or auto")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SdloraError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    AcceleratorState._reset_state(reset_partial_state=single)
    try:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            cpu=device == "cpu",
            log_with=list(log_with),
            project_dir=str(run_dir),
        )
    except ImportError as e:  # e.g. a DeepSpeed config without deepspeed installed
        raise SdloraError(f"accelerate could not start: {e}. {PLAIN_PARALLEL}") from None
    except ValueError as e:  # a tracker that is not installed
        raise SdloraError(f"train.log_with: {e}") from None
    check_parallelism(accelerator)
    return accelerator


PLAIN_PARALLEL = (
    "sdlora trains with plain data parallelism (every process holds the frozen base, the LoRA's "
    "gradients are averaged): launch with `accelerate launch --multi_gpu` and no DeepSpeed or "
    "FSDP config"
)


def check_parallelism(accelerator) -> None:
    """Refuse a sharded setup (DeepSpeed, FSDP, Megatron) rather than silently not shard."""
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise SdloraError(f"accelerate is configured for {kind.value}; {PLAIN_PARALLEL}")


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cast_frozen(base: Base, mixed_precision: str) -> torch.dtype:
    """Store the frozen base in the mixed-precision dtype, as sd-scripts and diffusers' training
    scripts do: half the memory, and no per-step casts under autocast. Call before LoRA layers
    are added (diffusers' `cast_training_params` then keeps them in float32).

    SDXL's VAE stays in float32: in float16 it overflows to NaN (its `force_upcast` flag); the
    half-precision latents the pipelines hand it are cast up on the way in.
    Returns the dtype of the UNet's frozen weights.
    """
    dtype = HALF_DTYPES.get(mixed_precision, torch.float32)
    # torch's own `to`: diffusers' warns about fp32-only modules even when a model has none.
    for module in (base.unet, *base.text_encoders.values()):
        torch.nn.Module.to(module, dtype=dtype)
    if base.family != "sdxl":
        torch.nn.Module.to(base.vae, dtype=dtype)
    elif dtype != torch.float32:
        first = getattr(base.vae, "post_quant_conv", None) or base.vae.decoder
        first.register_forward_pre_hook(_to_own_dtype)
    return dtype


def _to_own_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class Offload:
    """Frozen modules kept out of the way while the training loop does not need them.

    Once every latent is cached the VAE is only needed for samples, and a frozen text encoder
    whose outputs are all cached likewise. On a CUDA device they wait in host memory, freeing
    their weights (and the VAE's activations) for the UNet. On the CPU their tensors are
    written once to `folder` (a file per module; the weights are frozen, so later parks only
    let go of them) and read back when needed: the loop's memory is the UNet's.
    `use()` brings them back for a while; `close()` deletes the files.
    """

    def __init__(self, modules: list[torch.nn.Module], device: torch.device, folder: Path):
        self.modules, self.device = modules, device
        self.folder = None
        if modules and device.type != "cuda":
            for stale in folder.glob(".parked-*"):  # left by a run that was killed
                shutil.rmtree(stale, ignore_errors=True)
            self.folder = Path(tempfile.mkdtemp(prefix=".parked-", dir=folder))
            # A run stopped by an error or a signal still leaves no files behind.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def park(self) -> None:
        for i, module in enumerate(self.modules):
            if self.folder is None:
                module.to("cpu")
                continue
            path = self.folder / f"{i}.safetensors"
            if not path.is_file():
                save_file({k: t.contiguous() for k, t in _tensors(module).items()}, path)
            torch.nn.Module.to(module, "meta")  # frees the weights
        if not self.modules:
            return
        if self.folder is None:
            torch.cuda.empty_cache()
        else:
            release_freed_memory()

    def unpark(self) -> None:
        for i, module in enumerate(self.modules):
            if self.folder is None:
                module.to(self.device)
            elif next(module.parameters()).is_meta:
                torch.nn.Module.to_empty(module, device=self.device)
                # One tensor at a time: never the module twice in memory.
                with safe_open(self.folder / f"{i}.safetensors", "pt") as stored, torch.no_grad():
                    for name, tensor in _tensors(module).items():
                        tensor.copy_(stored.get_tensor(name))

    @contextmanager
    def use(self):
        self.unpark()
        try:
            yield
        finally:
            self.park()

    def close(self) -> None:
        """Bring every module back and delete the parked files."""
        self.unpark()
        if self.folder is not None:
            self._cleanup()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps many freed blocks for reuse, so
    the resident set would not shrink when parked weights are let go; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by name, non-persistent buffers included."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@contextmanager
def training_autocast(accelerator: Accelerator, models: list[torch.nn.Module]):
    """accelerate's autocast for a training forward pass.

    Under bf16/fp16 the LoRA layers' inputs stay in the half dtype: peft would cast each one up
    to the LoRA's float32 and autocast would cast it back down, which keeps a second copy of
    every LoRA layer's input for the backward pass, for the same values.
    """
    half = accelerator.mixed_precision in HALF_DTYPES
    with ExitStack() as stack:
        stack.enter_context(accelerator.autocast())
        for model in models:
            stack.enter_context(disable_input_dtype_casting(model, active=half))
        yield


def prepare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model` as accelerate wraps it for training (DistributedDataParallel under several
    processes). Its own forward stays plain: accelerate would wrap it in autocast for every
    caller, sampling pipelines included, and return float32 outputs that the half-precision
    VAE then refuses; the training step enters autocast itself (`training_autocast`)."""
    wrapped = accelerator.prepare(model)
    # The patch is an instance attribute over the class's forward. (accelerate's own
    # `unwrap_model(keep_fp32_wrapper=False)` unwraps past transformers' forward decorators.)
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)
    return wrapped


@contextmanager
def trackers(accelerator: Accelerator):
    """accelerate's trackers (TensorBoard events in the run's logs/ folder) for a while; closed
    and flushed however the run ends. (Not `end_training()`: it also ends the process group,
    which the run still needs after the loop.)"""
    accelerator.init_trackers("logs")
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


def take_batch(order, accelerator: Accelerator) -> list[int]:
    """This process's batch: of every `num_processes` batches, the one at its index."""
    batches = [next(order) for _ in range(accelerator.num_processes)]
    return batches[accelerator.process_index]


@contextmanager
def out_of_memory_advice(step: int):
    """Out of memory, on a GPU or in the CPU's allocator, as one line saying what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        cpu_oom = "can't allocate memory" in str(e) or "DefaultCPUAllocator" in str(e)
        if not isinstance(e, torch.OutOfMemoryError) and not cpu_oom:
            raise
        raise SdloraError(
            f"out of memory at step {step}: lower train.batch_size or dataset.resolution, or set "
            "train.gradient_checkpointing=true and train.mixed_precision=bf16"
        ) from None


def ranks_agree(params: dict[str, torch.Tensor], accelerator: Accelerator) -> bool:
    """Whether every process holds the same LoRA weights (a checksum compared across ranks)."""
    if accelerator.num_processes == 1:
        return True
    total = torch.stack([p.detach().double().sum() for p in params.values()]).sum()
    sums = accelerator.gather(total.reshape(1).to(accelerator.device))
    return bool(torch.all(sums == sums[0]))


class PeakMemory:
    """Peak memory from now on: CUDA allocations on a GPU, the process's resident set on CPU.

    On Linux the resident-set high-water mark is reset here too (`/proc/self/clear_refs`), so
    the figure is the training loop's, not the loading's (where float32 weights are read before
    a cast to bf16); elsewhere it is the whole process's `ru_maxrss`.
    """

    STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            self.CLEAR.write_text("5")  # 5: reset the peak resident set size
            self.proc = "VmHWM" in self.STATUS.read_text()
        except OSError:
            self.proc = False

    def megabytes(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self.proc:
            line = next(x for x in self.STATUS.read_text().splitlines() if x.startswith("VmHWM"))
            return round(int(line.split()[1]) / 1024, 1)  # "VmHWM:  123456 kB"
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
