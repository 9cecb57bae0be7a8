"""The studio's job queue: `sdlora train` and `sdlora caption` run as child processes, one at a
time per device (`cpu`, `cuda:0`, `cuda:1`, ...), in submission order on each device; every
job's state lives in the workspace, so a restarted UI shows the truth.

Layout: `<workspace>/jobs/<id>/` holds `job.json` (what was asked and the last known state),
`pid.json` (the child's pid and start time, so a reused pid is not taken for it), `exit.json`
(written by the child as it ends), `stdout.log` and `stderr.log`. A job whose process is gone
without an `exit.json` was killed: it is shown as failed with the last lines of its stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sdlora.export import write_atomic

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
DONE, STOPPED, FAILED, CANCELLED = "done", "stopped", "failed", "cancelled"
ACTIVE = (RUNNING, STOPPING)
FINAL = (DONE, STOPPED, FAILED, CANCELLED)
STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the trainer's exit after a signal
START_GRACE_S = 30.0  # how long a started job may run before its child has written pid.json
ERROR_LINES = 15
NICENESS = 5  # a job's CPU priority below the UI's: a page loads quickly while a job trains


@dataclass
class Job:
    """One queued command and what became of it (the fields of job.json)."""

    id: str
    kind: str
    """`train` or `caption`."""
    args: list[str]
    """The `sdlora` arguments, e.g. `["train", "/ws/jobs/0001/config.toml", "--no-progress"]`."""
    title: str = ""
    device: str = "cpu"
    """What the job computes on: `cpu` or `cuda:N`. One job at a time runs per device; a
    `cuda:N` job sees only that GPU (CUDA_VISIBLE_DEVICES), a `cpu` job none."""
    run_dir: str | None = None
    steps: int | None = None
    """The step a train job ends at, when known."""
    continues: str | None = None
    """The job whose run this one resumes."""
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    error: str = ""
    stop_requested: bool = False

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def process_alive(pid: int, created: float) -> bool:
    """True when `pid` runs and is the process started at `created` (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tail_lines(path: Path, n: int = ERROR_LINES) -> str:
    """The last `n` non-empty lines of a log (progress-bar redraws dropped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [part.split("\r")[-1].rstrip() for part in text.splitlines()]
    return "\n".join([line for line in lines if line.strip()][-n:])


class JobQueue:
    """The jobs of one workspace. `tick()` brings every job's state up to date and starts, on
    each device with no job running, the oldest job queued for it; `start()` runs `tick()` in a
    background thread."""

    def __init__(self, workspace: str | Path, python: str = sys.executable):
        self.root = Path(workspace).resolve() / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self._children: dict[str, subprocess.Popen] = {}
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    # --- the records on disk
    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: Job) -> None:
        write_json(self.folder(job.id) / "job.json", dataclasses.asdict(job))

    def _load(self, job_id: str) -> Job | None:
        data = read_json(self.folder(job_id) / "job.json")
        if data is None:
            return None
        known = {f.name for f in dataclasses.fields(Job)}
        return Job(**{k: v for k, v in data.items() if k in known})

    @contextlib.contextmanager
    def _locked(self):
        """One UI (or test) at a time decides what starts: an exclusive lock on the workspace."""
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- asking
    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id (numbered in submission order) and its folder, created empty."""
        with self._locked():
            numbers = [int(p.name) for p in self.root.iterdir() if p.name.isdigit()]
            job_id = f"{max(numbers, default=0) + 1:04d}"
            folder = self.folder(job_id)
            folder.mkdir()
        return job_id, folder

    def submit(self, job: Job) -> Job:
        """Queue `job` (its id from `new_folder`); it starts when every earlier job on its
        device has ended."""
        job.status = QUEUED
        self._save(job)
        return job

    def jobs(self) -> list[Job]:
        """Every job, oldest first, each in its true state."""
        found = [self._load(p.name) for p in sorted(self.root.iterdir()) if p.name.isdigit()]
        return [self.refresh(job) for job in found if job is not None]

    def get(self, job_id: str) -> Job:
        job = self._load(job_id)
        if job is None:
            raise KeyError(job_id)
        return self.refresh(job)

    # --- the truth about a job
    def refresh(self, job: Job) -> Job:
        """Settle an active job's state from its exit record, its process, or their absence."""
        if not job.active:
            return job
        folder = self.folder(job.id)
        child = self._children.get(job.id)
        if child is not None:
            child.poll()  # reap our own child so it is not left a zombie
        exit_record = read_json(folder / "exit.json")
        if exit_record is not None:
            return self._finish(job, int(exit_record["code"]), exit_record.get("ended"))
        pid = read_json(folder / "pid.json")
        if pid is not None and process_alive(pid["pid"], pid["created"]):
            return job
        if pid is None and time.time() - (job.started or 0) < START_GRACE_S:
            return job  # the child is still starting
        how = (
            f"killed by signal {-child.returncode}"
            if child is not None and child.returncode is not None and child.returncode < 0
            else "ended without reporting how (killed, or the machine restarted)"
        )
        return self._finish(job, None, None, f"the job's process {how}")

    def _finish(self, job: Job, code: int | None, ended: float | None, why: str = "") -> Job:
        job.exit_code = code
        job.ended = ended or time.time()
        log = tail_lines(self.folder(job.id) / "stderr.log")
        if code == 0:
            job.status, job.error = DONE, ""
        elif code in STOP_CODES:
            job.status, job.error = STOPPED, log
        else:
            job.status = FAILED
            job.error = "\n".join(x for x in (why, log) if x) or f"exit code {code}, no output"
        self._children.pop(job.id, None)
        self._save(job)
        return job

    # --- running
    def tick(self) -> list[Job]:
        """Update every job; on each free device start the oldest job queued for it. Returns
        the jobs started."""
        with self._locked():
            jobs = self.jobs()
            busy = {job.device for job in jobs if job.active}
            started = []
            for job in jobs:  # oldest first: submission order on each device
                if job.status == QUEUED and job.device not in busy:
                    busy.add(job.device)
                    started.append(self._launch(job))
            return started

    def _launch(self, job: Job) -> Job:
        folder = self.folder(job.id)
        job.status, job.started = RUNNING, time.time()
        self._save(job)  # first, so a crash right after the start is not a second start
        with open(folder / "stdout.log", "ab") as out, open(folder / "stderr.log", "ab") as err:
            child = subprocess.Popen(
                [self.python, "-m", "sdlora.studio.runner", str(folder), *job.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=folder,
                env=job_environment(job.device),
                start_new_session=True,  # the job outlives the UI (Ctrl-C or a crash)
            )
        self._children[job.id] = child
        with contextlib.suppress(psutil.NoSuchProcess):
            record_pid(folder, child.pid)
        return job

    def stop(self, job_id: str) -> Job:
        """Cancel a queued job, or ask a running one to stop (the trainer checkpoints first)."""
        with self._locked():
            job = self.get(job_id)
            if job.status == QUEUED:
                job.status, job.ended = CANCELLED, time.time()
            elif job.active:
                pid = read_json(self.folder(job.id) / "pid.json")
                if pid is not None and process_alive(pid["pid"], pid["created"]):
                    os.kill(pid["pid"], signal.SIGTERM)
                job.status, job.stop_requested = STOPPING, True
            self._save(job)
        return job

    def start(self, interval: float = 0.5) -> None:
        """Run `tick()` every `interval` seconds in a daemon thread."""

        def loop():
            while not self._halt.wait(interval):
                with contextlib.suppress(Exception):  # a bad record must not end the scheduler
                    self.tick()

        self._thread = threading.Thread(target=loop, name="sdlora-jobs", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()


def job_environment(device: str) -> dict[str, str]:
    """The child's environment: unbuffered logs (readable while it runs), and only its own
    GPU visible, so two jobs on two GPUs cannot meet on one."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gpu = ""
    if device.startswith("cuda:"):
        index = int(device.removeprefix("cuda:"))
        # cuda:N counts the GPUs the UI itself sees, which its own CUDA_VISIBLE_DEVICES may limit
        visible = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
        gpu = visible[index] if index < len(visible) else str(index)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def record_pid(folder: Path, pid: int) -> None:
    """Write `pid.json`: the pid and the start time that tells it from a later reuse."""
    write_json(folder / "pid.json", {"pid": pid, "created": psutil.Process(pid).create_time()})
