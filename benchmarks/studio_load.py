"""Studio page load: how long until the page is usable in Chromium, idle and while a tiny job
trains on both cores, printed as a table.

    python benchmarks/studio_load.py                 # 8 loads idle, 8 while training
    python benchmarks/studio_load.py --loads 12 --cold

A load is a new browser page opened on the studio's URL until the Dataset screen's folder box
is on screen (what a person waits for); `--cold` also opens each in a fresh browser context
(no cached scripts). While the job trains, a second page stays on the Jobs screen, refreshing
every second, as a person watching the run would have it. The machine's load average is
printed with each row: other work on it moves the figures, so compare rows of one run. The CPU
seconds the page's renderer and the UI server spent on each load (medians) move much less.
Needs playwright and Debian's chromium (/usr/bin/chromium), as the browser tests do.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("SDLORA_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(workspace: Path, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """`sdlora ui` in a child process; returns it and the seconds until it answered."""
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the jobs it starts train on both cores
    process = subprocess.Popen(
        [sys.executable, "-m", "sdlora", "ui", "--workspace", str(workspace), "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - started < 300:
        if process.poll() is not None:
            raise SystemExit(log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, time.perf_counter() - started
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the studio did not answer in 300 s")


def html_seconds(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
    return time.perf_counter() - started


def page_seconds(browser, url: str, cold: bool) -> tuple[float, float]:
    """Seconds until the page is usable, and the CPU seconds the page's renderer spent."""
    context = browser.new_context() if cold else browser.contexts[0]
    started = time.perf_counter()
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    page.goto(url)
    page.wait_for_selector("#ds-folder textarea, #ds-folder input", state="visible")
    took = time.perf_counter() - started
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    page.close()
    if cold:
        context.close()
    return took, metrics["TaskDuration"]


def measure(browser, url: str, ui, loads: int, cold: bool) -> dict[str, list[float]]:
    """`loads` page loads; with each, the UI server's CPU seconds and the load average."""
    import psutil

    server = psutil.Process(ui.pid)
    found = {"html": [], "page": [], "browser_cpu": [], "server_cpu": [], "load1": []}
    for _ in range(loads):
        found["html"].append(html_seconds(url))
        before = sum(server.cpu_times()[:2])
        took, cpu = page_seconds(browser, url, cold)
        found["server_cpu"].append(sum(server.cpu_times()[:2]) - before)
        found["page"].append(took)
        found["browser_cpu"].append(cpu)
        found["load1"].append(os.getloadavg()[0])
        time.sleep(0.5)
    return found


def submit_job(workspace: Path, steps: int) -> str:
    """A tiny:sd1 run queued in the workspace; the UI's scheduler starts it."""
    from sdlora.cli import examples_root
    from sdlora.configfile import load_config
    from sdlora.studio import runs
    from sdlora.studio.jobs import JobQueue

    overrides = [
        "model.base=tiny:sd1",
        f"dataset.path={examples_root() / 'datasets_examples' / 'stripes'}",
        "dataset.trigger=zkstripes",
        "dataset.resolution=64",
        f"output.dir={workspace / 'runs' / 'bench'}",
        f"train.steps={steps}",
        "train.batch_size=2",
        "lora.rank=4",
        "sample.steps=2",
        "sample.every=50",
        "sample.report_images=0",
        "output.bundle=false",
    ]
    return runs.submit_train(JobQueue(workspace), load_config(None, overrides)).id


def row(name: str, values: dict[str, list[float]]) -> str:
    page = sorted(values["page"])
    p90 = page[min(len(page) - 1, round(0.9 * (len(page) - 1)))]
    median = {key: statistics.median(v) for key, v in values.items()}
    return (
        f"| {name} | {len(page)} | {median['page']:.2f} | {p90:.2f} | {page[0]:.2f} | "
        f"{page[-1]:.2f} | {median['html']:.3f} | {median['browser_cpu']:.2f} | "
        f"{median['server_cpu']:.2f} | {min(values['load1']):.1f}-{max(values['load1']):.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=8, help="page loads per condition")
    parser.add_argument("--cold", action="store_true", help="a fresh browser context per load")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from sdlora.studio.jobs import JobQueue

    root = Path(tempfile.mkdtemp(prefix="studio_load_"))
    workspace = root / "workspace"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    ui, startup = start_ui(workspace, port, root / "ui.log")
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            browser.new_context()
            page_seconds(browser, url, cold=False)  # the first load fills the script cache
            rows.append(row("idle", measure(browser, url, ui, args.loads, args.cold)))

            job_id = submit_job(workspace, steps=100_000)
            watcher = browser.contexts[0].new_page()
            watcher.goto(url)
            watcher.get_by_role("tab", name="Jobs").click()
            watcher.wait_for_selector("#w-progress :text('loss')", timeout=180_000)
            busy = measure(browser, url, ui, args.loads, args.cold)
            rows.append(row("a tiny job training", busy))
            watcher.close()
            JobQueue(workspace).stop(job_id)
            browser.close()
    finally:
        ui.kill()
        ui.wait()
    print(f"studio answered {startup:.1f} s after `sdlora ui` started ({os.cpu_count()} cores)")
    cache = "a fresh context each" if args.cold else "scripts cached"
    print(f"page load: until the Dataset screen is usable in Chromium ({cache})\n")
    print("| condition | loads | median s | p90 s | min s | max s | HTML s | page CPU s | "
          "server CPU s | load avg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
