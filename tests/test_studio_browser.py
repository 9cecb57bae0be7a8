"""The studio in a real browser (Playwright driving Debian's headless Chromium), one test per
thing a person does. One app server for the module; a screenshot per screen in each test's
temp folder (and in $SDLORA_STUDIO_SHOTS when set, which is how docs/ gets its pictures).

Selected with `-m browser`. Without playwright or /usr/bin/chromium they skip, except under CI
(CI=true), where they fail: the CI image must have them (`.ci/run` installs chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import EXAMPLES, tiny_overrides
from messy import make_messy

pytestmark = pytest.mark.browser
CHROMIUM = Path(os.environ.get("SDLORA_CHROMIUM", "/usr/bin/chromium"))
WAIT_MS = 90_000


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (make install)"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run under CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # a tiny run takes seconds; a busy CI machine, more
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Studio:
    """`sdlora ui` as a child process on a free port; `restart(kill=True)` is a kill -9."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.workspace.parent / "ui.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdlora", "ui", "--workspace", str(self.workspace),
             "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.workspace.parent / "ui.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the studio did not start in 180 s")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def job_pids(self) -> list[int]:
        pids = []
        for record in self.workspace.glob("jobs/*/pid.json"):
            pids.append(json.loads(record.read_text())["pid"])
        return pids


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    studio = Studio(tmp_path_factory.mktemp("studio") / "workspace")
    studio.workspace.mkdir()
    studio.start()
    yield studio
    studio.kill()
    for pid in studio.job_pids():  # jobs outlive the UI by design; not the test session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def page(browser, studio):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(studio.url)
    page.wait_for_selector("#tabs")
    yield page
    page.close()


def shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=tmp_path / f"{name}.png", full_page=True)
    docs = os.environ.get("SDLORA_STUDIO_SHOTS")
    if docs:
        page.screenshot(path=Path(docs) / f"studio-{name}.png", full_page=True)


def box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def copy_examples(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for image in sorted(EXAMPLES.glob("*.png"))[:n]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder


def tiny_toml(dataset: Path, run_dir: Path, steps: int) -> str:
    from sdlora.configfile import config_to_toml, load_config

    overrides = tiny_overrides(dataset, run_dir, steps) + ["sample.report_images=0"]
    return config_to_toml(load_config(None, overrides))


def set_editor(page, text: str) -> None:
    page.locator("#tr-toml .cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def test_a_messy_folder_names_every_bad_file(page, tmp_path):
    from playwright.sync_api import expect

    expected = make_messy(tmp_path / "messy")
    box(page, "ds-folder").fill(str(tmp_path / "messy"))
    box(page, "ds-trigger").fill("zkstyle")
    box(page, "ds-res").fill("64")
    page.locator("#ds-scan").click()
    problems = page.locator("#ds-problems")
    expect(problems).to_contain_text("skipped")
    text = problems.inner_text()
    for name in expected["skipped"]:
        assert f"skipped {name}" in text, name
    expect(page.locator("#ds-summary")).to_contain_text(f"{len(expected['skipped'])} skipped")
    shot(page, tmp_path, "dataset")


def test_an_edited_caption_is_on_disk(page, tmp_path):
    from playwright.sync_api import expect

    folder = copy_examples(tmp_path / "style")
    box(page, "ds-folder").fill(str(folder))
    box(page, "ds-trigger").fill("zkstripes")
    box(page, "ds-res").fill("64")
    page.locator("#ds-scan").click()
    expect(page.locator("#ds-summary")).to_contain_text("6 usable")
    box(page, "ds-file").click()
    page.get_by_role("option", name="02_white_triangle.png").click()
    expect(box(page, "ds-caption")).to_have_value("a white triangle")
    box(page, "ds-caption").fill("zkstripes, a white triangle, edited in the studio")
    page.locator("#ds-save-one").click()
    expect(page.locator("#ds-saved")).to_contain_text(
        "saved 1 caption file(s): 02_white_triangle.txt"
    )
    on_disk = (folder / "02_white_triangle.txt").read_text(encoding="utf-8")
    assert on_disk == "zkstripes, a white triangle, edited in the studio\n"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp left
    expect(page.locator("#ds-tags")).to_contain_text("edited in the studio")
    shot(page, tmp_path, "caption-saved")


def test_queue_watch_stop_continue_finish(page, studio, tmp_path):
    from playwright.sync_api import expect

    folder = copy_examples(tmp_path / "style")
    run_dir = studio.workspace / "runs" / "story"
    open_tab(page, "Train")
    base = box(page, "tr-base")
    base.fill("micro")
    base.press("Enter")
    expect(page.locator("#tr-family")).to_contain_text("family: sd1")
    expect(box(page, "tr-preset")).to_have_value("demo")  # the micro base's preset, filled in
    expect(box(page, "tr-steps")).to_have_value("300")
    expect(page.locator("#tr-toml .cm-content")).to_contain_text('base = "micro"')
    set_editor(page, tiny_toml(folder, run_dir, steps=60).replace("steps = 2\n", "steps = 1\n"))
    expect(box(page, "tr-steps")).to_have_value("60")  # the editor updated the form
    set_editor(page, tiny_toml(folder, run_dir, steps=60).replace("[lora]\n", "[lora]\nrnk = 4\n"))
    expect(page.locator("#tr-error")).to_contain_text("unknown key lora.rnk")
    page.locator("#tr-queue").click()
    expect(page.locator("#tr-status")).to_contain_text("not queued")  # an invalid config
    set_editor(page, tiny_toml(folder, run_dir, steps=60))
    expect(page.locator("#tr-error")).to_be_empty()
    page.locator("#tr-estimate-button").click()
    expect(page.locator("#tr-estimate")).to_contain_text("6 images")
    shot(page, tmp_path, "train")
    page.locator("#tr-queue").click()
    expect(page.locator("#tr-status")).to_contain_text("queued job")

    open_tab(page, "Jobs")
    progress = page.locator("#w-progress")
    expect(progress).to_contain_text("running")
    expect(page.locator("#w-samples img").first).to_be_visible()  # the step-0 grid
    expect(progress).to_contain_text("loss")  # a logged step
    expect(page.locator("#w-loss canvas, #w-loss svg").first).to_be_visible()

    started = time.perf_counter()  # a page load while the job trains
    other = page.context.browser.new_page()
    other.goto(studio.url)
    other.wait_for_selector("#ds-folder")
    load_s = time.perf_counter() - started
    other.close()
    (tmp_path / "page_load_s.txt").write_text(f"{load_s:.2f}\n")
    print(f"page load while training: {load_s:.2f} s")
    # The bar is 2 s on an idle machine; shared CI cores get a margin, a hung UI does not.
    assert load_s < 10

    shot(page, tmp_path, "watch-running")
    page.locator("#w-stop").click()
    expect(progress).to_contain_text("stopped")
    expect(page.locator("#w-error textarea")).to_have_value(re.compile("Resume with"))
    stopped_at = int(progress.inner_text().split("step ")[1].split("/")[0])
    assert 1 <= stopped_at < 60

    box(page, "w-more").fill("2")
    page.locator("#w-continue").click()
    expect(page.locator("#w-message")).to_contain_text(f"to step {stopped_at + 2}")
    expect(progress).to_contain_text("job 0002")
    expect(progress).to_contain_text("done")
    expect(progress).to_contain_text(f"step {stopped_at + 2}/{stopped_at + 2}")
    expect(page.locator("#w-files")).to_contain_text(re.compile(r"style\s*\.safetensors"))
    shot(page, tmp_path, "watch-done")
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in lines if "loss" in entry]  # not the validation lines
    assert steps == list(range(1, stopped_at + 3))


def test_a_ui_killed_mid_job_shows_the_true_state_after_restart(page, browser, studio, tmp_path):
    from playwright.sync_api import expect

    folder = copy_examples(tmp_path / "style")
    open_tab(page, "Train")
    set_editor(page, tiny_toml(folder, studio.workspace / "runs" / "killed", steps=2000))
    page.locator("#tr-queue").click()
    expect(page.locator("#tr-status")).to_contain_text("queued job")
    job_id = page.locator("#tr-status strong").first.inner_text()
    open_tab(page, "Jobs")
    expect(page.locator("#w-progress")).to_contain_text("loss")  # training has begun

    studio.kill()  # kill -9 the UI; the job goes on without it
    studio.start()
    page.goto(studio.url)
    open_tab(page, "Jobs")
    progress = page.locator("#w-progress")
    expect(progress).to_contain_text(f"job {job_id} · running")
    shot(page, tmp_path, "restarted-running")

    pid = json.loads((studio.workspace / "jobs" / job_id / "pid.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # now the job dies too
    expect(progress).to_contain_text("failed")
    expect(page.locator("#w-error textarea")).to_have_value(
        re.compile("ended without reporting how")
    )
    expect(page.locator("#w-jobs")).to_contain_text("failed")
    shot(page, tmp_path, "restarted-failed")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A tiny:sd1 LoRA file with trigger zkstripes (random weights: what matters here is the
    file, its family and its metadata; training is covered by the queue test)."""
    from conftest import random_lora

    from sdlora.export import build_metadata, save_lora

    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    metadata = build_metadata(family="sd1", title="style", rank=4, alpha=2.0,
                              trigger_words=["zkstripes"], resolution=64)  # fmt: skip
    return save_lora(path, random_lora("sd1"), "sd1", "kohya", metadata, "fp32")


def test_generate_with_the_lora_shows_the_infotext(page, studio, lora_file, tmp_path):
    from playwright.sync_api import expect

    open_tab(page, "Generate")
    box(page, "g-loras").fill(f"{lora_file}:0.8")
    box(page, "g-prompt").fill("a circle")
    for elem_id, value in (("g-steps", "2"), ("g-width", "64"), ("g-height", "64")):
        box(page, elem_id).fill(value)
    page.locator("#g-run").click()
    info = box(page, "g-info")
    expect(info).to_have_value(re.compile("Steps: 2"))
    text = info.input_value()
    assert text.startswith("zkstripes, a circle")  # the trigger put in
    assert "Size: 64x64" in text and 'Lora hashes: "style: ' in text
    expect(page.locator("#g-images img").first).to_be_visible()
    saved = sorted((studio.workspace / "images").glob("image_*.png"))
    assert saved
    from PIL import Image

    assert Image.open(saved[-1]).info["parameters"] == text
    shot(page, tmp_path, "generate")

    page.locator("#g-ab").click()
    expect(page.locator("#g-message")).to_contain_text("A/B from one seed")
    expect(page.locator("#g-images img")).to_have_count(4)
    shot(page, tmp_path, "generate-ab")


def test_a_mismatched_lora_is_refused_in_words(page, lora_file, tmp_path):
    from playwright.sync_api import expect

    open_tab(page, "Generate")
    base = box(page, "g-base")
    base.fill("tiny:sdxl")
    base.press("Enter")
    box(page, "g-loras").fill(str(lora_file))
    page.locator("#g-run").click()
    expect(page.locator("#g-message")).to_contain_text(
        "Refused: style was trained for SD 1.x; the base is SDXL"
    )
    shot(page, tmp_path, "generate-refused")


def test_inspect_and_convert_a_lora(page, studio, lora_file, tmp_path):
    from playwright.sync_api import expect

    open_tab(page, "Export")
    box(page, "e-file").fill(str(lora_file))
    page.locator("#e-inspect").click()
    expect(page.locator("#e-summary")).to_contain_text("sd1")
    expect(page.locator("#e-summary")).to_contain_text("triggers: zkstripes")
    page.locator("#e-convert").click()
    out = studio.workspace / "exports" / "style-diffusers.safetensors"
    expect(page.locator("#e-converted")).to_contain_text(f"wrote {out}")
    assert out.is_file()
    box(page, "e-bundle-base").fill("tiny:sd1")
    page.locator("#e-bundle").click()
    bundle = studio.workspace / "bundles" / "style"
    expect(page.locator("#e-bundled")).to_contain_text(f"wrote {bundle}", timeout=120_000)
    expect(page.locator("#e-bundled")).to_contain_text("civitai.json")
    assert (bundle / "README.md").is_file() and (bundle / "civitai.json").is_file()
    shot(page, tmp_path, "export")
