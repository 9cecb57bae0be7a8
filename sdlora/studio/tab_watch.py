"""The Jobs screen: the queue, and one job watched live (step, pace, ETA, the loss curve from
log.jsonl, sample grids as they are written, the report and the run's files); Stop, Continue."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.studio import runs
from sdlora.studio.jobs import FAILED, QUEUED, Job, JobQueue

REFRESH_S = 1.0


HEADERS = ["job", "kind", "title", "status", "step", "queued at"]


def run_targets(jobs: list[Job]) -> dict[str, int | None]:
    """The step each run now trains to: that of its newest job (a Continue raises it)."""
    return {job.run_dir: job.steps for job in jobs if job.run_dir}


def job_rows(jobs: list[Job]) -> list[list]:
    """The queue table, newest first. A train job's step is its run's: a run continued by a
    later job shows where the run is now on every one of its jobs."""
    targets = run_targets(jobs)
    rows = []
    for job in reversed(jobs):
        when = datetime.datetime.fromtimestamp(job.created).strftime("%H:%M:%S")
        step = ""
        if job.kind == "train" and job.run_dir:
            done, target = runs.read_log(Path(job.run_dir))[0], targets[job.run_dir]
            step = f"{done[-1] if done else 0}/{target}" if target else ""
        rows.append([job.id, job.kind, job.title, job.status, step, when])
    return rows


def progress_text(
    job: Job, progress: runs.Progress | None, captions: int = 0, target: int | None = None
) -> str:
    """The watched job's line; `target` is the step its run now trains to (see run_targets)."""
    parts = [f"job **{job.id}** · **{job.status}**"]
    if progress is not None and job.kind == "train":
        target = target or job.steps
        total = f"/{target}" if target else ""
        parts.append(f"step **{progress.step}{total}**")
        if progress.per_s:
            parts.append(f"{progress.per_s:.2f} it/s")
        if progress.eta_s is not None:
            parts.append(f"ETA {progress.eta_s:.0f} s")
        if progress.losses:
            parts.append(f"loss {progress.losses[-1]:.4f}")
    if job.kind == "caption" and job.status != QUEUED:
        parts.append(f"{captions} caption(s) written")
    if job.status == QUEUED:
        parts.append("waiting for the jobs before it")
    return " · ".join(parts)


def caption_count(log: Path) -> int:
    """Captions an `sdlora caption` job has written so far (it prints a line per file)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0
    return sum(line.startswith("wrote ") for line in lines)


def build(queue: JobQueue):
    import gradio as gr
    import pandas as pd

    table = gr.Dataframe(headers=HEADERS,
                         interactive=False, elem_id="w-jobs", label="Queue")  # fmt: skip
    with gr.Row():
        pick = gr.Dropdown(label="Watch job", choices=[], allow_custom_value=True,
                           elem_id="w-job", scale=2)  # fmt: skip
        stop = gr.Button("Stop", variant="stop", elem_id="w-stop")
        more = gr.Number(100, label="More steps", precision=0, elem_id="w-more")
        resume = gr.Button("Continue", elem_id="w-continue")
    progress = gr.Markdown(elem_id="w-progress")
    message = gr.Markdown(elem_id="w-message")
    error = gr.Textbox(label="Error / last log lines", lines=6, elem_id="w-error", visible=False)
    loss = gr.LinePlot(x="step", y="loss", title="loss", elem_id="w-loss", height=260)
    samples = gr.Gallery(label="Sample grids (rows: prompts; newest last)", columns=3,
                         object_fit="contain", elem_id="w-samples", height=320)  # fmt: skip
    with gr.Row():
        ab = gr.Image(label="A/B: base vs LoRA, without / with trigger", elem_id="w-ab")
        report = gr.Markdown(elem_id="w-report")
    files = gr.File(label="Run files", file_count="multiple", interactive=False, elem_id="w-files")
    seen = gr.State({})
    pace: dict[str, tuple[int, float]] = {}

    def refresh(chosen, last):
        jobs = queue.jobs()
        ids = [job.id for job in reversed(jobs)]
        # The choice is only set when there is none: a tick must not undo the user's pick.
        pick_update = gr.update(choices=ids)
        if chosen not in ids:
            chosen = ids[0] if ids else None
            pick_update = gr.update(choices=ids, value=chosen)
        rows = job_rows(jobs)
        if chosen is None:
            return (
                rows,
                pick_update,
                "no jobs yet: queue one on the Train screen",
                *([gr.skip()] * 6),
                last,
            )
        job = next(j for j in jobs if j.id == chosen)
        prog = runs.run_progress(job, pace) if job.kind == "train" and job.run_dir else None
        captions = caption_count(queue.folder(job.id) / "stdout.log")
        text = progress_text(job, prog, captions, run_targets(jobs).get(job.run_dir))
        show_error = job.status == FAILED or (job.error and job.status != "done")
        err = gr.update(value=job.error, visible=bool(show_error))
        if prog is None:
            return rows, pick_update, text, err, *([gr.skip()] * 5), last
        # Heavy parts are sent only when they changed.
        key = lambda name, value: last.get(f"{chosen}:{name}") != value  # noqa: E731
        state = dict(last)
        out = []
        sig = (prog.step, len(prog.losses))
        if key("loss", sig):
            state[f"{chosen}:loss"] = sig
            out.append(pd.DataFrame({"step": prog.steps, "loss": prog.losses}))
        else:
            out.append(gr.skip())
        names = [str(p) for p in prog.samples]
        if key("samples", names):
            state[f"{chosen}:samples"] = names
            out.append([(p, p.stem.replace("_", " ")) for p in prog.samples])
        else:
            out.append(gr.skip())
        ab_path = (prog.files[0].parent / "ab_grid.png") if prog.files else None
        ab_value = str(ab_path) if ab_path and ab_path.is_file() else None
        if key("ab", ab_value):
            state[f"{chosen}:ab"] = ab_value
            out.append(ab_value)
        else:
            out.append(gr.skip())
        out.append(report_text(prog.report) if prog.report else "")
        file_names = [str(p) for p in prog.files]
        if key("files", file_names):
            state[f"{chosen}:files"] = file_names
            out.append(file_names or None)
        else:
            out.append(gr.skip())
        return rows, pick_update, text, err, *out, state

    outputs = [table, pick, progress, error, loss, samples, ab, report, files, seen]
    # Polls only while the screen is open: a page on another screen costs the server nothing.
    timer = gr.Timer(REFRESH_S, active=False)
    timer.tick(refresh, [pick, seen], outputs, show_progress="hidden")
    pick.input(lambda c: refresh(c, {}), [pick], outputs)

    def follow_tabs(this_tab, other_tabs) -> None:
        """Refresh at once and poll while `this_tab` is shown; stop when another is."""
        this_tab.select(lambda c, last: (gr.Timer(active=True), *refresh(c, last)),
                        [pick, seen], [timer, *outputs], show_progress="hidden")  # fmt: skip
        for tab in other_tabs:
            tab.select(lambda: gr.Timer(active=False), None, timer, show_progress="hidden")

    def do_stop(chosen):
        if not chosen:
            return "pick a job"
        job = queue.stop(chosen)
        if job.status == "stopping":
            return (
                f"job {job.id}: stopping; the trainer finishes its step, writes a checkpoint "
                "and ends (Stop again: at once, without a checkpoint)"
            )
        return f"job {job.id}: {job.status}"

    stop.click(do_stop, pick, message)

    def do_continue(chosen, n):
        try:
            job = runs.submit_continue(queue, chosen, int(n or 0))
        except (SdloraError, KeyError) as e:
            return f"**cannot continue:** {e}", gr.skip()
        ids = [j.id for j in reversed(queue.jobs())]
        return (
            f"queued job {job.id}: {job.title} (to step {job.steps})",
            gr.update(choices=ids, value=job.id),
        )

    resume.click(do_continue, [pick, more], [message, pick])
    return follow_tabs


def report_text(report: dict) -> str:
    """The learning report's headline numbers, then the whole of it."""
    lines = ["**Learning report**"]
    for key, value in report.items():
        if isinstance(value, (int, float, str)):
            lines.append(f"- {key}: {value}")
    lines.append("\n```json\n" + json.dumps(report, indent=1)[:3000] + "\n```")
    return "\n".join(lines)
