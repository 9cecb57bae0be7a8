"""The process a studio job runs in: `python -m sdlora.studio.runner JOB_FOLDER sdlora-args...`.

It is the `sdlora` command (the same `cli.main`), with two additions the queue relies on: it
records its pid and start time first, and it writes `exit.json` with its exit code last. A
SIGTERM before the trainer installs its own handler stops it like Ctrl-C (exit 130). It runs
at a lower CPU priority, so the UI and the browser stay quick while it takes every core.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    folder, args = Path(argv[0]), argv[1:]
    from sdlora.studio.jobs import NICENESS, record_pid, write_json

    record_pid(folder, os.getpid())
    os.nice(NICENESS)
    signal.signal(signal.SIGTERM, _interrupt)
    code = 1
    try:
        from sdlora.cli import main as sdlora_main

        code = sdlora_main(args)
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        write_json(folder / "exit.json", {"code": code, "ended": time.time()})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
