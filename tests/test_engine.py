"""The training engine: exact resume, signals, faults, options, several processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from conftest import tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora import load_config, train
from sdlora.checkpoint import MARKER, complete_checkpoints
from sdlora.errors import SdloraError
from sdlora.guard import IncompatibleLora
from sdlora.models import load_base
from sdlora.runtime import Offload, PeakMemory, check_parallelism
from sdlora.step import diffusion_loss, encode_text
from sdlora.train import fixed_captions, scan_dataset

# Augmentations and a schedule with state, so resuming must restore every random stream.
RICH = [
    "dataset.flip=true",
    "dataset.shuffle_tags=true",
    "dataset.caption_dropout=0.2",
    "train.lr_scheduler=cosine",
    "train.warmup_steps=1",
    "train.noise_offset=0.05",
    "train.min_snr_gamma=5",
    "output.dtype=fp32",
    "sample.report_images=0",
]


def _config(style_dir, out, steps, *extra):
    return load_config(None, tiny_overrides(style_dir, out, steps) + RICH + list(extra))


def _loss_lines(out) -> int:
    """log.jsonl's training-loss lines (its validation lines have `val_loss` instead)."""
    lines = (out / "log.jsonl").read_text().splitlines()
    return sum('"loss"' in line for line in lines)


@pytest.mark.parametrize(
    "algo",
    [[], ["lora.algo=locon", "lora.dora=true"], ["lora.algo=loha"], ["lora.algo=lokr"]],
    ids=["lora", "locon+dora", "loha", "lokr"],
)
def test_resume_gives_bit_identical_weights_and_logs(algo, style_dir, tmp_path):
    straight = tmp_path / "straight"
    train(_config(style_dir, straight, 4, "train.save_every=2", *algo), progress=False)
    assert [p.name for p in complete_checkpoints(straight)] == ["step_000002", "step_000004"]

    # The same run stopped after step 2: its folder as it was then, resumed from there.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    (resumed / "style.safetensors").unlink()
    config = _config(style_dir, resumed, 4, "train.save_every=2", "train.resume=latest", *algo)
    result = train(config, progress=False)
    assert json.loads((resumed / "run.json").read_text())["resumed_at"] == 2

    a, b = load_file(straight / "style.safetensors"), load_file(resumed / "style.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "log.jsonl").read_text() == (resumed / "log.jsonl").read_text()
    assert len(result.losses) == 4
    judged = [
        [
            (e["step"], e["val_loss"], e["lora"])
            for e in json.loads((run / "checkpoints.json").read_text())
        ]
        for run in (straight, resumed)
    ]
    assert judged[0] == judged[1] and [e[0] for e in judged[0]] == [2, 4]


def test_checkpoints_are_complete_and_pruned(style_dir, tmp_path):
    out = tmp_path / "run"
    train(_config(style_dir, out, 3, "train.save_every=1", "train.keep_last=2"), progress=False)
    found = complete_checkpoints(out)
    assert [p.name for p in found] == ["step_000002", "step_000003"]
    assert all((p / MARKER).is_file() and (p / "lora.safetensors").is_file() for p in found)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_refuses_a_checkpoint_of_another_model(style_dir, tmp_path):
    out = tmp_path / "run"
    train(_config(style_dir, out, 1, "train.save_every=1"), progress=False)
    with pytest.raises(IncompatibleLora, match="trained on SD 1.x; the base is SDXL"):
        train(_config(style_dir, out, 2, "train.resume=latest", "model.base=tiny:sdxl"))
    with pytest.raises(IncompatibleLora, match="does not match this run's LoRA"):
        train(_config(style_dir, out, 2, "train.resume=latest", "lora.rank=8"))
    with pytest.raises(SdloraError, match="no complete checkpoint"):
        train(_config(style_dir, tmp_path / "empty", 2, "train.resume=latest"))


def test_sigint_finishes_the_step_saves_and_prints_the_resume_command(style_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text("")
    args = tiny_overrides(style_dir, out, steps=5000) + ["sample.report_images=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdlora", "train", str(config), *args, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "log.jsonl").is_file() and _loss_lines(out) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "Resume with: sdlora train" in stderr and "train.resume=latest" in stderr
    (checkpoint,) = complete_checkpoints(out)
    step = int(checkpoint.name.split("_")[1])
    assert step == _loss_lines(out)
    assert not (out / "style.safetensors").exists()
    assert not list(out.glob(".parked-*"))  # the parked VAE's file went with the process
    # The printed command works: the run goes on from that step.
    result = train(
        load_config(out / "config.toml", ["train.resume=latest", f"train.steps={step + 1}"]),
        progress=False,
    )
    assert json.loads((out / "run.json").read_text())["resumed_at"] == step
    assert result.lora_path.is_file()


def test_non_finite_loss_stops_with_step_and_files_and_writes_no_lora(style_dir, tmp_path):
    out = tmp_path / "run"
    config = _config(style_dir, out, 20, "train.lr=1e30", "train.save_every=1",
                     "train.max_grad_norm=0")  # fmt: skip
    with pytest.raises(SdloraError, match=r"(loss became nan|not finite) at step \d+") as e:
        train(config, progress=False)
    assert ".png" in str(e.value) or "LoRA weight" in str(e.value)
    assert not (out / "style.safetensors").exists()
    for checkpoint in complete_checkpoints(out):
        weights = load_file(checkpoint / "lora.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_min_snr_weighting_and_noise_offset():
    base = load_base("tiny:sd1")
    text, _ = encode_text(base, ["zk"], "cpu")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 900])
    with torch.no_grad():
        plain = diffusion_loss(base.unet, base.scheduler, latents, text.expand(2, -1, -1), noise, t)
        huge = diffusion_loss(base.unet, base.scheduler, latents, text.expand(2, -1, -1), noise, t,
                              min_snr_gamma=1e9)  # fmt: skip
        weighted = diffusion_loss(base.unet, base.scheduler, latents, text.expand(2, -1, -1),
                                  noise, t, min_snr_gamma=1.0)  # fmt: skip
    assert torch.allclose(plain, huge) and weighted < plain


def test_epochs_set_the_number_of_steps(style_dir, tmp_path):
    config = _config(style_dir, tmp_path / "run", 1, "train.epochs=1", "dataset.repeats=1",
                     "train.batch_size=3")  # fmt: skip
    result = train(config, progress=False)
    assert len(result.losses) == 2  # 6 images, batch 3


def test_gradient_checkpointing_gives_the_same_lora_gradients(style_dir, tmp_path):
    a = train(_config(style_dir, tmp_path / "a", 2), progress=False)
    b = train(_config(style_dir, tmp_path / "b", 2, "train.gradient_checkpointing=true"),
              progress=False)  # fmt: skip
    wa, wb = load_file(a.lora_path), load_file(b.lora_path)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_up" in k)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("train.attention=xformers", "xformers needs a CUDA device"),
        ("train.mixed_precision=fp16", "fp16 needs a CUDA device"),
    ],
)
def test_unavailable_options_are_refused_plainly(style_dir, tmp_path, extra, message):
    if torch.cuda.is_available():
        pytest.skip("these are refusals on a machine without CUDA")
    with pytest.raises(SdloraError, match=message):
        train(_config(style_dir, tmp_path / "run", 1, extra), progress=False)


def test_optional_optimizers_say_how_to_install_them(style_dir, tmp_path):
    for name, package in (("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(SdloraError, match=f"pip install {package}"):
                train(
                    _config(style_dir, tmp_path / name, 1, f"train.optimizer={name}"),
                    progress=False,
                )


def test_starting_from_an_existing_lora(trained, style_dir, tmp_path):
    config = _config(style_dir, tmp_path / "run", 1, f"lora.init_from={trained.lora_path}",
                     "lora.rank=4", "lora.alpha=4", "train.lr=1e-12")  # fmt: skip
    result = train(config, progress=False)
    start, end = load_file(trained.lora_path), load_file(result.lora_path)
    # alpha 2 in the file, 4 here: the up matrices are rescaled so the update is the same.
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert torch.allclose(
        end[f"{key}.lora_up.weight"] * 4, start[f"{key}.lora_up.weight"] * 2, atol=1e-6
    )
    with pytest.raises(IncompatibleLora, match="trained for SD 1.x; the base is SDXL"):
        train(_config(style_dir, tmp_path / "xl", 1, f"lora.init_from={trained.lora_path}",
                      "model.base=tiny:sdxl"))  # fmt: skip


def test_two_processes_agree_and_only_rank_zero_writes(style_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text("")
    # One epoch: 6 images in batches of 2 are 3 batches, which two processes take in 2 steps.
    args = tiny_overrides(style_dir, out) + [
        "train.device=cpu",
        "sample.report_images=0",
        "dataset.repeats=1",
        "train.epochs=1",
    ]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "-m", "sdlora", "train", str(config), *args,
                "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "run.json").read_text())
    assert report["processes"] == 2 and report["ranks_agree"] is True
    assert report["distributed"] == "MULTI_CPU"  # accelerate's DDP: bucketed all-reduce
    assert _loss_lines(out) == 2
    with safe_open(out / "style.safetensors", "pt") as f:
        assert f.metadata()["ss_epoch"] == "1" and f.metadata()["ss_steps"] == "2"
    assert len(list((out / "logs").iterdir())) == 1
    assert result.stdout.count("LoRA:") == 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bf16_stores_the_frozen_base_in_bf16_and_trains_the_lora_in_fp32(
    style_dir, tmp_path, family
):
    overrides = [f"model.base=tiny:{family}", "train.mixed_precision=bf16", "output.dtype=fp32"]
    result = train(load_config(None, tiny_overrides(style_dir, tmp_path, 2) + overrides),
                   progress=False)  # fmt: skip
    base = result.base
    for model in (base.unet, base.text_encoder):
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # SDXL's VAE overflows in half precision; it stays float32 and still decodes bf16 latents.
    assert base.vae.dtype == (torch.float32 if family == "sdxl" else torch.bfloat16)
    assert (tmp_path / "samples" / "step_000002.png").is_file()
    weights = load_file(result.lora_path)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_up" in k)


def test_fixed_captions_are_every_caption_the_loop_can_ask_for(style_dir):
    config = _config(style_dir, style_dir, 1, "dataset.shuffle_tags=false")  # dropout 0.2
    scan = scan_dataset(config.dataset)
    captions = fixed_captions(scan, config.dataset, None)
    assert captions[-1] == "" and len(captions) == len(scan.examples) + 1
    assert all(c.startswith("zkstripes") for c in captions[:-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_peak_memory_counts_from_its_start():
    block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    del block
    status = open("/proc/self/status").read()
    before = int(status.split("VmHWM:")[1].split()[0]) / 1024
    assert PeakMemory(torch.device("cpu")).megabytes() < before - 150


def test_a_deepspeed_launch_is_refused_plainly(style_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what a DeepSpeed config sets
    with pytest.raises(SdloraError, match="plain data parallelism"):
        train(_config(style_dir, tmp_path / "run", 1), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM"])
def test_sharded_setups_are_refused_and_plain_ones_pass(kind):
    class Launched:
        distributed_type = DistributedType[kind]

    with pytest.raises(SdloraError, match=f"configured for {kind}"):
        check_parallelism(Launched())
    Launched.distributed_type = DistributedType.MULTI_GPU
    check_parallelism(Launched())


def test_parked_modules_leave_memory_and_come_back_unchanged(tmp_path):
    base = load_base("tiny:sd1")
    modules = [base.vae, base.text_encoder]
    before = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in modules]
    before = [{k: t.clone() for k, t in d.items()} for d in before]
    text, _ = encode_text(base, ["zkstripes, a circle"], "cpu")

    offload = Offload(modules, torch.device("cpu"), tmp_path)
    offload.park()
    assert all(p.is_meta for m in modules for p in m.parameters())
    (folder,) = tmp_path.glob(".parked-*")
    files = {f: f.stat().st_mtime_ns for f in folder.iterdir()}
    assert len(files) == 2
    with offload.use():  # back for a while: every tensor as it was, buffers included
        for m, saved in zip(modules, before, strict=True):
            now = {**dict(m.named_parameters()), **dict(m.named_buffers())}
            assert now.keys() == saved.keys()
            assert all(torch.equal(now[k], saved[k]) for k in saved)
        assert torch.equal(encode_text(base, ["zkstripes, a circle"], "cpu")[0], text)
    assert all(p.is_meta for m in modules for p in m.parameters())
    assert {f: f.stat().st_mtime_ns for f in folder.iterdir()} == files  # written once
    offload.close()
    assert not folder.exists() and not any(p.is_meta for m in modules for p in m.parameters())


def test_a_run_parks_the_vae_and_text_encoder_and_cleans_up(style_dir, tmp_path, monkeypatch):
    parked = []
    park = Offload.park

    def watched(self):
        park(self)
        parked.append([type(m).__name__ for m in self.modules if next(m.parameters()).is_meta])

    monkeypatch.setattr(Offload, "park", watched)
    out = tmp_path / "run"
    (out / ".parked-killed").mkdir(parents=True)  # what a killed run leaves behind
    (out / ".parked-killed" / "0.safetensors").write_bytes(b"x" * 1000)
    overrides = tiny_overrides(style_dir, out, 2) + ["lora.text_encoder=false"]
    result = train(load_config(None, overrides), progress=False)
    # Parked before the loop and again after the first samples; back for the end.
    assert parked == [["AutoencoderKL", "CLIPTextModel"]] * 2
    assert not list(out.glob(".parked-*"))
    for module in (result.base.vae, result.base.text_encoder):
        assert not any(p.is_meta for p in module.parameters())
    assert (out / "samples" / "step_000002.png").is_file() and result.learning is not None


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_run_json_peak_memory_is_the_loops_not_the_last_samples(style_dir, tmp_path, monkeypatch):
    evaluate_module = sys.modules["sdlora.evaluate"]
    real_sample, held = evaluate_module.sample, []

    def heavy_last_sample(base, config, run_dir, step):
        if step == config.train.steps:
            held.append(np.ones(400 * 2**20 // 8))  # 400 MB, touched, kept to the end
        return real_sample(base, config, run_dir, step)

    monkeypatch.setattr(evaluate_module, "sample", heavy_last_sample)
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(style_dir, out, 2)), progress=False)
    status = open("/proc/self/status").read()
    whole = int(status.split("VmHWM:")[1].split()[0]) / 1024
    assert held and json.loads((out / "run.json").read_text())["peak_memory_mb"] < whole - 300


def test_bf16_training_forward_keeps_lora_inputs_in_bf16_with_the_same_gradients(tmp_path):
    from diffusers.training_utils import cast_training_params

    from sdlora.lora import UNET_ATTENTION, inject_lora
    from sdlora.runtime import cast_frozen, make_accelerator, training_autocast

    base = load_base("tiny:sd1")
    cast_frozen(base, "bf16")
    inject_lora(base.unet, 4, 4, UNET_ATTENTION)
    cast_training_params(base.unet, torch.float32)
    for p in base.unet.parameters():  # non-zero up matrices, so every LoRA weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
    accelerator = make_accelerator("bf16", "cpu", tmp_path)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        text, _ = encode_text(base, ["zkstripes", "a circle"], "cpu")
    timesteps = torch.tensor([10, 900])

    def step(autocast):
        saved = []

        def pack(t):
            saved.append(t.untyped_storage())
            return t

        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = diffusion_loss(base.unet, base.scheduler, latents, text, noise, timesteps)
        loss.backward()
        grads = [p.grad.clone() for p in base.unet.parameters() if p.requires_grad]
        base.unet.zero_grad(set_to_none=True)
        return grads, sum({s.data_ptr(): s.nbytes() for s in saved}.values())

    plain, plain_bytes = step(accelerator.autocast())
    ours, our_bytes = step(training_autocast(accelerator, [base.unet]))
    assert all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))
    assert our_bytes < plain_bytes


def test_no_sample_prompts_draw_no_sample_grids(style_dir, tmp_path):
    out = tmp_path / "run"
    overrides = ["sample.prompts=[]", "sample.every=1", "sample.report_images=0"]
    result = train(load_config(None, tiny_overrides(style_dir, out, 2) + overrides),
                   progress=False)  # fmt: skip
    assert result.samples == [] and not (out / "samples").exists()
    assert result.lora_path.is_file() and (out / "loss.png").is_file()


def test_each_checkpoint_leaves_a_loadable_lora_of_its_step(style_dir, tmp_path):
    from safetensors import safe_open

    from sdlora.lorafile import read_lora

    out = tmp_path / "run"
    train(_config(style_dir, out, 4, "train.save_every=2", "train.keep_last=1"), progress=False)
    files = sorted(p.name for p in out.glob("style*.safetensors") if "best" not in p.name)
    assert files == ["style-step000002.safetensors", "style-step000004.safetensors",
                     "style.safetensors"]  # fmt: skip
    final, last, first = (load_file(out / name) for name in reversed(files))
    assert final.keys() == last.keys() == first.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert not all(torch.equal(final[k], first[k]) for k in final)
    with safe_open(out / files[0], "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_max_train_steps"] == "4"
    assert read_lora(out / files[0]).family == "sd1"

    quiet = tmp_path / "quiet"
    train(_config(style_dir, quiet, 2, "train.save_every=1", "output.step_loras=false"),
          progress=False)  # fmt: skip
    assert [p.name for p in quiet.glob("*.safetensors")] == ["style.safetensors"]


def test_cpu_out_of_memory_is_one_line_with_what_to_lower(style_dir, tmp_path, monkeypatch):
    def allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 274877906944 bytes.")  # fmt: skip

    monkeypatch.setattr(sys.modules["sdlora.step"].Stepper, "_loss", allocator_fails)
    config = load_config(None, tiny_overrides(style_dir, tmp_path / "run", 2))
    with pytest.raises(SdloraError, match="out of memory at step 1: lower train.batch_size"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "style.safetensors").exists()


def test_other_runtime_errors_are_not_called_out_of_memory():
    from sdlora.runtime import out_of_memory_advice

    with pytest.raises(RuntimeError, match="shape mismatch"):
        with out_of_memory_advice(3):
            raise RuntimeError("shape mismatch")


def test_a_failure_after_the_lora_is_saved_says_so_and_writes_run_json(
    style_dir, tmp_path, monkeypatch
):
    evaluate_module = sys.modules["sdlora.evaluate"]
    real_sample = evaluate_module.sample

    def last_sample_fails(base, config, run_dir, step):
        if step == config.train.steps:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_sample(base, config, run_dir, step)

    monkeypatch.setattr(evaluate_module, "sample", last_sample_fails)
    out = tmp_path / "run"
    with pytest.raises(SdloraError, match="style.safetensors is saved, but the end-of-run"):
        train(load_config(None, tiny_overrides(style_dir, out, 2)), progress=False)
    assert load_file(out / "style.safetensors")
    report = json.loads((out / "run.json").read_text())
    assert report["steps"] == 2 and "can't allocate memory" in report["error"]


def test_a_run_removes_checkpoint_folders_a_killed_run_left_half_written(
    style_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    train(_config(style_dir, out, 2, "train.save_every=2"), progress=False)
    stale = out / "checkpoints" / ".step_000004.k1ll3d"
    stale.mkdir()
    (stale / "lora.safetensors").write_bytes(b"half")
    config = _config(style_dir, out, 4, "train.save_every=2", "train.resume=latest")
    train(config, progress=False)
    assert not stale.exists()
    assert f"removed {stale}" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["step_000002", "step_000004"]


def test_a_damaged_checkpoint_is_named_with_the_one_to_resume_from_and_left_alone(
    style_dir, tmp_path, capsys
):
    from sdlora.cli import main

    out = tmp_path / "run"
    train(_config(style_dir, out, 2, "train.save_every=1"), progress=False)
    earlier, damaged = complete_checkpoints(out)
    state = damaged / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a copy cut short
    with (out / "log.jsonl").open("a") as log:
        log.write('{"step": 3, "lo')  # a run killed while writing a line
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config = tmp_path / "c.toml"
    config.write_text("")
    args = ["train", str(config), *tiny_overrides(style_dir, out, 3), *RICH, "--no-progress"]
    capsys.readouterr()

    assert main([*args, "train.save_every=1", "train.resume=latest"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"sdlora: error: checkpoint file {state} ")
    assert f"resume from an earlier checkpoint with train.resume={earlier}" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # Resumed from the earlier one: the half-written log line is left out, with a warning.
    assert main([*args, "train.save_every=1", f"train.resume={earlier}"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("sdlora: warning:")]
    assert len(warned) == 1 and f"{out / 'log.jsonl'} line " in warned[0], err
    assert "is not a whole log entry" in warned[0] and "Traceback" not in err
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3]
