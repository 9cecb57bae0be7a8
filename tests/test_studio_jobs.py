"""The studio's job queue without a browser: real `sdlora train` children on tiny:sd1, stopped,
continued, killed, and read back by a fresh queue as a restarted UI would."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from sdlora.configfile import load_config
from sdlora.errors import SdloraError
from sdlora.studio import jobs, runs
from sdlora.studio.jobs import Job, JobQueue


def tiny_config(dataset: Path, out: Path, steps: int):
    overrides = tiny_overrides(dataset, out, steps) + ["sample.report_images=0"]
    return load_config(None, overrides)


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def settle(queue, job_id, timeout=120.0):
    def ended():
        queue.tick()
        job = queue.get(job_id)
        return job if job.status in jobs.FINAL else None

    return wait_for(ended, timeout, f"job {job_id} to end")


def test_stop_then_continue_keeps_the_step_count(style_dir, tmp_path):
    queue = JobQueue(tmp_path / "ws")
    config = tiny_config(style_dir, tmp_path / "run", steps=40)
    job = runs.submit_train(queue, config)
    assert job.status == jobs.QUEUED and job.steps == 40
    queue.tick()
    assert queue.get(job.id).status == jobs.RUNNING
    wait_for(lambda: runs.read_log(tmp_path / "run")[0], what="the first logged step")
    queue.stop(job.id)
    stopped = settle(queue, job.id)
    assert stopped.status == jobs.STOPPED, stopped.error
    assert stopped.exit_code in jobs.STOP_CODES
    assert "Resume with" in stopped.error
    at = runs.read_log(tmp_path / "run")[0][-1]
    assert 1 <= at < 40

    more = runs.submit_continue(queue, job.id, 2)
    assert more.steps == at + 2 and more.continues == job.id
    done = settle(queue, more.id)
    assert done.status == jobs.DONE, done.error
    steps, losses = runs.read_log(tmp_path / "run")
    assert steps == list(range(1, at + 3))  # continuous: no gap, no repeat
    assert (tmp_path / "run" / "style.safetensors").is_file()
    # the finished run keeps its last step as a checkpoint, so it can be continued again
    assert (tmp_path / "run" / "checkpoints" / f"step_{at + 2:06d}").is_dir()
    progress = runs.run_progress(done)
    assert progress.step == at + 2 and progress.samples


def test_a_killed_ui_and_a_killed_job_show_their_true_state(style_dir, tmp_path):
    workspace = tmp_path / "ws"
    queue = JobQueue(workspace)
    first = runs.submit_train(queue, tiny_config(style_dir, tmp_path / "a", steps=400))
    second = runs.submit_train(queue, tiny_config(style_dir, tmp_path / "b", steps=2))
    queue.tick()
    wait_for(lambda: runs.read_log(tmp_path / "a")[0], what="the first logged step")

    # A restarted UI: a new queue on the same workspace. The job still runs, and nothing else
    # starts beside it.
    restarted = JobQueue(workspace)
    restarted.tick()
    assert restarted.get(first.id).status == jobs.RUNNING
    assert restarted.get(second.id).status == jobs.QUEUED

    pid = json.loads((workspace / "jobs" / first.id / "pid.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _gone(pid), what="the kill")
    again = JobQueue(workspace)
    failed = wait_for(lambda: (j := again.get(first.id)).status == jobs.FAILED and j, 10)
    assert "ended without reporting how" in failed.error
    assert failed.exit_code is None
    # the next job in the queue runs once the dead one is settled
    assert settle(again, second.id).status == jobs.DONE


def test_jobs_on_two_devices_run_together_and_on_one_device_in_turn(style_dir, tmp_path):
    # Real tiny trainings, labelled with the device the queue schedules them on; the config
    # trains on the CPU, so the test needs no GPU (a cuda:N job only has CUDA_VISIBLE_DEVICES=N).
    workspace = tmp_path / "ws"
    queue = JobQueue(workspace)

    def submit(name, device, steps=400):
        job = runs.submit_train(queue, tiny_config(style_dir, tmp_path / name, steps), device="cpu")
        job.device = device
        return queue.submit(job)

    a = submit("a", "cuda:0")
    b = submit("b", "cuda:0", steps=2)
    c = submit("c", "cpu")
    assert [job.id for job in queue.tick()] == [a.id, c.id]  # b waits for a, c does not
    record = json.loads((workspace / "jobs" / a.id / "job.json").read_text())
    assert record["device"] == "cuda:0"
    wait_for(lambda: runs.read_log(tmp_path / "a")[0] and runs.read_log(tmp_path / "c")[0],
             what="both jobs to log a step")  # fmt: skip
    assert _cuda_visible(workspace, a.id) == "0" and _cuda_visible(workspace, c.id) == ""

    restarted = JobQueue(workspace)  # a restarted UI starts nothing beside them
    assert restarted.tick() == []
    states = {job.id: job.status for job in restarted.jobs()}
    assert states == {a.id: jobs.RUNNING, b.id: jobs.QUEUED, c.id: jobs.RUNNING}

    restarted.stop(a.id)
    assert settle(restarted, a.id).status == jobs.STOPPED
    assert restarted.get(c.id).status == jobs.RUNNING
    assert settle(restarted, b.id).status == jobs.DONE  # next on cuda:0, while c still runs
    restarted.stop(c.id)
    assert settle(restarted, c.id).status == jobs.STOPPED


def _cuda_visible(workspace: Path, job_id: str) -> str:
    pid = json.loads((workspace / "jobs" / job_id / "pid.json").read_text())["pid"]
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"CUDA_VISIBLE_DEVICES"].decode()


def test_a_job_goes_to_the_device_asked_for_or_the_least_busy_gpu():
    def job(device, status=jobs.QUEUED):
        return Job(id="x", kind="train", args=[], device=device, status=status)

    assert runs.job_device("auto", [], gpus=0) == "cpu"
    assert runs.job_device("cpu", [], gpus=2) == "cpu"
    assert runs.job_device("auto", [], gpus=2) == "cuda:0"
    busy = [job("cuda:0", jobs.RUNNING), job("cuda:0"), job("cuda:1"), job("cuda:1", jobs.DONE)]
    assert runs.job_device("auto", busy, gpus=2) == "cuda:1"
    assert runs.job_device("cuda", busy, gpus=3) == "cuda:2"
    assert runs.job_device("cuda:0", busy, gpus=2) == "cuda:0"
    with pytest.raises(SdloraError, match="device cuda:2 is not one of the 2 GPU"):
        runs.job_device("cuda:2", [], gpus=2)
    with pytest.raises(SdloraError, match="train.device is cuda but the studio sees no GPU"):
        runs.job_device("cuda", [], gpus=0)


def test_a_cuda_job_sees_only_its_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert jobs.job_environment("cuda:1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert jobs.job_environment("cpu")["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the UI itself limited to two GPUs
    assert jobs.job_environment("cuda:1")["CUDA_VISIBLE_DEVICES"] == "6"


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it when it was our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1].startswith("Z")


def test_a_reused_pid_is_not_taken_for_the_job(tmp_path):
    queue = JobQueue(tmp_path / "ws")
    job_id, folder = queue.new_folder()
    job = Job(id=job_id, kind="train", args=["train", "x.toml"], status=jobs.RUNNING)
    job.started = time.time() - 3600
    jobs.write_json(folder / "job.json", dataclasses.asdict(job))
    (folder / "stderr.log").write_text("sdlora: training...\nlast words\n")
    # this test's own pid is alive, but it is not the process that started the job
    jobs.write_json(folder / "pid.json", {"pid": os.getpid(), "created": 12345.0})
    seen = queue.get(job_id)
    assert seen.status == jobs.FAILED
    assert "last words" in seen.error
    assert json.loads((folder / "job.json").read_text())["status"] == jobs.FAILED


def test_queued_jobs_run_one_at_a_time_in_order_fail_in_words_and_can_be_cancelled(tmp_path):
    queue = JobQueue(tmp_path / "ws")
    ids = []
    for _ in range(3):
        job_id, _ = queue.new_folder()
        queue.submit(Job(id=job_id, kind="train", args=["train", "absent.toml"]))
        ids.append(job_id)
    assert ids == sorted(ids)
    queue.stop(ids[1])
    assert queue.get(ids[1]).status == jobs.CANCELLED
    started = queue.tick()
    assert [job.id for job in started] == [ids[0]]
    assert queue.tick() == []  # one at a time on the one device
    failed = settle(queue, ids[0], 60)
    assert failed.status == jobs.FAILED and failed.exit_code == 2  # a failed job says why
    assert "sdlora: error: config file absent.toml does not exist" in failed.error
    assert settle(queue, ids[2], 60).status == jobs.FAILED
    assert queue.get(ids[1]).status == jobs.CANCELLED


def test_an_invalid_config_names_the_key():
    with pytest.raises(Exception, match="train.stepz"):
        runs.parse_config('[dataset]\npath = "/x"\ntrigger = "t"\n[train]\nstepz = 3\n')


def test_ui_refuses_a_public_address_without_a_password(capsys):
    from sdlora.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--workspace", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: error: --host 0.0.0.0") and "--auth" in err
    assert main(["ui", "--host", "0.0.0.0", "--auth", "nocolon"]) == 2
    assert "user:password" in capsys.readouterr().err


def test_a_password_makes_a_public_address_a_warning():
    from sdlora.studio.app import check_binding

    assert check_binding("127.0.0.1", None) is None
    assert check_binding("localhost", None) is None
    assert "anyone who can reach" in check_binding("0.0.0.0", ("u", "p"))


def test_the_core_package_does_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, sdlora, sdlora.cli, sdlora.studio; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_finished_run_shows_its_report_grids_and_files(trained):
    job = Job(id="0001", kind="train", args=[], run_dir=str(trained.run_dir), steps=3)
    job.status = jobs.DONE
    progress = runs.run_progress(job, {})
    assert progress.step == 3 and len(progress.losses) == 3
    assert progress.report is not None and "style_shift_with_trigger" in progress.report
    names = [p.name for p in progress.files]
    assert {"style.safetensors", "ab_grid.png", "run.json", "learning_report.json"} <= set(names)
    assert [p.name for p in progress.samples] == ["step_000000.png", "step_000003.png"]
    assert progress.per_s is None  # no pace for a job that is not running


def test_the_loss_curve_leaves_out_validation_lines(tmp_path):
    from sdlora.studio.runs import read_log

    (tmp_path / "log.jsonl").write_text(
        '{"step": 0, "val_loss": 0.5, "val_images": "2 held out"}\n'
        '{"step": 1, "loss": 0.9, "lr": 0.001}\n'
        '{"step": 2, "loss": 0.8, "lr": 0.001}\n'
        '{"step": 2, "val_loss": 0.4, "val_images": "2 held out"}\n'
        '{"step": 3, "lo'  # a line being written
    )
    assert read_log(tmp_path) == ([1, 2], [0.9, 0.8])


def test_after_continue_every_job_of_the_run_shows_where_the_run_is(tmp_path):
    from sdlora.studio.tab_watch import job_rows, progress_text

    run = tmp_path / "run"
    run.mkdir()
    log = run / "log.jsonl"
    log.write_text("".join(f'{{"step": {i}, "loss": 0.5}}\n' for i in range(1, 18)))
    first = Job(id="0001", kind="train", args=[], run_dir=str(run), steps=60)
    first.status = jobs.STOPPED
    assert job_rows([first])[0][4] == "17/60"
    more = Job(id="0002", kind="train", args=[], run_dir=str(run), steps=19, continues="0001")
    more.status = jobs.DONE
    with log.open("a") as f:  # the continuation's steps, appended to the same log
        f.write('{"step": 18, "loss": 0.4}\n{"step": 19, "loss": 0.3}\n')
    rows = job_rows([first, more])
    assert [(row[0], row[4]) for row in rows] == [("0002", "19/19"), ("0001", "19/19")]
    old = runs.run_progress(first)
    assert "step **19/19**" in progress_text(first, old, target=19)


def test_gradio_assets_are_cached_by_the_browser_and_the_page_is_not():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from sdlora.studio.app import CacheAssets

    def ok(request):
        return PlainTextResponse("x", headers={"cache-control": "no-cache"})

    routes = [Route("/assets/index-DphvyggB.js", ok), Route("/", ok)]
    client = TestClient(Starlette(routes=routes, middleware=[Middleware(CacheAssets)]))
    assert client.get("/assets/index-DphvyggB.js").headers["cache-control"] == (
        "public, max-age=31536000, immutable"
    )
    assert client.get("/").headers["cache-control"] == "no-cache"
    assert client.get("/assets/missing.js").status_code == 404
