"""sdlora studio: a local web UI (`sdlora ui`) over the same library functions as the CLI.

Gradio is imported only when the app starts, so `import sdlora` never needs it.
"""

from __future__ import annotations

import sys


def launch(host: str, port: int, workspace: str, auth: str | None) -> None:
    """Check the address and password, then serve the studio until interrupted."""
    from sdlora.errors import SdloraError
    from sdlora.studio.app import check_binding, parse_auth

    credentials = parse_auth(auth)
    warning = check_binding(host, credentials)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SdloraError(
            "the studio needs gradio: pip install 'sdlora[ui]' (or make install)"
        ) from None
    if warning:
        print(f"sdlora: warning: {warning}", file=sys.stderr)
    from sdlora.studio.app import serve

    serve(host, port, workspace, credentials)
