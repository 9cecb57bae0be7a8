"""The studio's Gradio app: five screens over one workspace, and `serve` for `sdlora ui`.

Every screen's callbacks call the library (the functions `sdlora check`, `caption`, `train`,
`generate`, `inspect` and `export` call); training runs in child processes (`jobs.py`).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.studio.jobs import JobQueue

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSS = """
#ds-table img { max-width: 64px; max-height: 64px; }
.saved { color: #1a7f37; font-weight: 600; }
.refusal { color: #b42318; font-weight: 600; }
"""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SdloraError(f"--auth must look like user:password, got {text!r}")
    return user, password


def check_binding(host: str, auth: tuple[str, str] | None) -> str | None:
    """Refuse a non-loopback address without a password; the warning to print with one."""
    if is_loopback(host):
        return None
    if auth is None:
        raise SdloraError(
            f"--host {host} makes the studio reachable from other machines; pass --auth "
            "user:password as well, or keep the default 127.0.0.1"
        )
    return (
        f"the studio listens on {host}: anyone who can reach this machine and knows the "
        "password can train, read and write files in the workspace"
    )


# Gradio's scripts and styles are named by their content's hash, but served without a
# Cache-Control header: a browser then asks the server again for each of its ~100 files on
# every page load once its heuristic freshness has run out, which is most of the load time on a
# busy machine. Marked immutable, they come from the browser's cache (a new Gradio version
# brings new names).
IMMUTABLE = b"/assets/"


class CacheAssets:
    """ASGI middleware: `Cache-Control: immutable` on Gradio's content-hashed files."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("raw_path") or scope.get("path", "").encode()
        if scope["type"] != "http" or not path.startswith(IMMUTABLE):
            return await self.app(scope, receive, send)

        async def send_cached(message):
            if message["type"] == "http.response.start" and message["status"] == 200:
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"cache-control"]
                headers.append((b"cache-control", b"public, max-age=31536000, immutable"))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_cached)


def build_app(workspace: Path, queue: JobQueue):
    """The Blocks app (not launched)."""
    import gradio as gr

    from sdlora.studio import tab_dataset, tab_tools, tab_train, tab_watch

    with gr.Blocks(title="sdlora studio") as app:
        gr.Markdown(f"## sdlora studio\nWorkspace: `{workspace}` (runs, jobs, images, exports)")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset") as dataset:
                tab_dataset.build(queue)
            with gr.Tab("Train", id="train", elem_id="tab-train") as train:
                tab_train.build(workspace, queue)
            with gr.Tab("Jobs", id="watch", elem_id="tab-watch") as watch:
                follow_tabs = tab_watch.build(queue)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as generate:
                tab_tools.build_generate(workspace)
            with gr.Tab("Export", id="export", elem_id="tab-export") as export:
                tab_tools.build_export(workspace)
        follow_tabs(watch, [dataset, train, generate, export])
    return app


def theme():
    """Gradio's default look with system fonts: nothing is fetched from the network."""
    import gradio as gr

    return gr.themes.Default(
        font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"],
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    workspace: str | Path = "studio",
    auth: tuple[str, str] | None = None,
    block: bool = True,
):
    """Start the job scheduler and the web server; returns (app, url) when `block` is False."""
    from starlette.middleware import Middleware

    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    queue = JobQueue(workspace)
    queue.start()
    app = build_app(workspace, queue)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        prevent_thread_lock=True,
        allowed_paths=[str(workspace)],
        theme=theme(),
        css=CSS,
        footer_links=[],
        quiet=True,
        ssr_mode=False,
        show_error=True,
        app_kwargs={"middleware": [Middleware(CacheAssets)]},
    )
    print(f"sdlora studio: {url} (workspace {workspace})", flush=True)
    if block:
        app.block_thread()
    return app, url
