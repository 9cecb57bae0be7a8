"""The Jobs screenshot of the README (docs/studio-jobs.png): configs/demo.toml on the micro
base, trained 80 steps, continued 20 more, finished with its learning report and A/B grid
(16 report images a set instead of the demo's 48, so it takes minutes, not tens of them).

    python scripts/studio_jobs_shot.py docs/studio-jobs.png

The other screenshots come from the browser tests (SDLORA_STUDIO_SHOTS=DIR pytest -m browser).
Needs playwright and Debian's chromium, as those tests do; takes a few minutes on a CPU.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from studio_load import CHROMIUM, free_port, start_ui  # noqa: E402

from sdlora.cli import examples_root  # noqa: E402
from sdlora.configfile import load_config  # noqa: E402
from sdlora.studio import runs  # noqa: E402
from sdlora.studio.jobs import FINAL, JobQueue  # noqa: E402


def settle(queue: JobQueue, job_id: str) -> None:
    while queue.get(job_id).status not in FINAL:
        time.sleep(1)


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="studio_shot_"))
    workspace, port = root / "workspace", free_port()
    ui, _ = start_ui(workspace, port, root / "ui.log")
    try:
        queue = JobQueue(workspace)
        demo = examples_root() / "configs" / "demo.toml"
        out_dir = workspace / "runs" / "bands"
        more = ["train.steps=80", "sample.report_images=16"]
        config = load_config(demo, [f"output.dir={out_dir}", *more])
        first = runs.submit_train(queue, config, title="bands (micro)")
        settle(queue, first.id)
        settle(queue, runs.submit_continue(queue, first.id, 20).id)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 960, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Jobs").click()
            page.wait_for_selector("#w-ab img")
            page.wait_for_selector("#w-progress :text('100/100')")
            page.wait_for_timeout(1500)  # the loss plot's drawing
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        ui.kill()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
