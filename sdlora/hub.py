"""Publishing a bundle on the Hugging Face Hub: `create_repo` + `upload_folder`, nothing more.

Refused before any request when the Hub is switched off (`HF_HUB_OFFLINE`, which the Makefile
sets) or no token is found where `huggingface_hub` looks (`HF_TOKEN`, `hf auth login`).
"""

from __future__ import annotations

import os
from pathlib import Path

from sdlora.errors import SdloraError

TRUE = {"1", "ON", "YES", "TRUE"}


def bundle_files(bundle: str | Path) -> list[tuple[str, int]]:
    """(path inside the bundle, size in bytes) of every file that would be uploaded."""
    bundle = Path(bundle)
    if not (bundle / "README.md").is_file() or not any(bundle.glob("*.safetensors")):
        raise SdloraError(
            f"{bundle} is not a bundle (no README.md and .safetensors); make one with "
            "`sdlora bundle RUN_DIR`"
        )
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [(p.relative_to(bundle).as_posix(), p.stat().st_size) for p in files]


def push_bundle(bundle: str | Path, repo: str, private: bool = False) -> str:
    """Upload `bundle` to the model repo `repo` (`user/name`, made if missing); its URL."""
    from huggingface_hub import HfApi, get_token

    bundle_files(bundle)
    check_repo_id(repo)
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE:
        raise SdloraError(
            "the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set); unset it "
            "(`HF_HUB_OFFLINE=0 sdlora push ...`) on a machine that is online"
        )
    token = get_token()
    if not token:
        raise SdloraError(
            "not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN "
            "to a token with write access"
        )
    api = HfApi(token=token)
    url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(bundle), repo_id=repo, repo_type="model",
                      commit_message="Upload LoRA bundle made by sdlora")  # fmt: skip
    return str(url)


def check_repo_id(repo: str) -> None:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise SdloraError(f"--repo must look like user/name, got {repo!r}")
