"""Reaching the Hugging Face hub: one clear error instead of a stack of retries.

Models and SAEs of the real-model presets come from the hub and are cached
under ``HF_HOME``. Before loading, ``require_hub`` checks that the files are
cached or that the hub answers; when the hub cannot be reached but the files
are cached, the process switches to offline mode so loaders read the cache
without retrying the network.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path


class HubUnavailableError(OSError):
    """A model or SAE is neither in the local hub cache nor downloadable."""


def hub_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint answers one request (checked once per process).

    One HEAD request through huggingface_hub's own HTTP session, so proxies set
    in the environment apply, and no retries.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:   # any failure to connect means "not reachable"
        return False


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The local snapshot folder of ``repo_id`` in the hub cache, or None."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except Exception:   # any failure here means "not cached"
        return None


def is_cached(repo_id: str, path_in_repo: str, repo_type: str = "model") -> bool:
    root = cached_snapshot(repo_id, repo_type)
    return root is not None and any(root.glob(path_in_repo))


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets read the cache without network calls."""
    from huggingface_hub import constants
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")   # read its flag at import
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def require_hub(repo_id: str, what: str, path_in_repo: str = "config.json",
                repo_type: str = "model", include: str | None = None) -> None:
    """Fail with one clear error unless ``repo_id`` is cached or the hub answers.

    what: a short description for the message ("model", "SAE repository").
    path_in_repo: a glob pattern whose presence in the cached snapshot means what
    is needed is there. include: the pattern to download, if not the whole repository.
    """
    if hub_reachable():
        return
    if is_cached(repo_id, path_in_repo, repo_type):
        go_offline()
        return
    gated = "google/gemma" in repo_id
    raise HubUnavailableError(
        f"the {what} {repo_id!r} is not in the local hub cache ({hub_cache_dir()}) and the "
        "Hugging Face hub cannot be reached from this machine. To get it: on a machine with "
        "internet access run `hf auth login`"
        + (f", accept the Gemma licence on https://huggingface.co/{repo_id}," if gated else ",")
        + f" then `hf download {repo_id}"
        + (f' --include "{include}"' if include else "")
        + (" --repo-type dataset" if repo_type == "dataset" else "")
        + "`; point HF_HOME at that cache (or copy it to this machine's HF_HOME). Runs with "
        "no network need HF_HUB_OFFLINE=1.")


def download_first_folder(repo_id: str, pattern: str) -> Path:
    """The snapshot folder of ``repo_id`` holding the first folder matching ``pattern``.

    Only that folder is downloaded (repositories of SAE sweeps hold many); with
    no network, the cached snapshot is used as it is.
    """
    require_hub(repo_id, "SAE repository", f"{pattern}/*.safetensors", include=f"{pattern}/*")
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return cached_snapshot(repo_id)
    from fnmatch import fnmatch

    from huggingface_hub import list_repo_files, snapshot_download
    folders = sorted({f.split("/")[0] for f in list_repo_files(repo_id) if "/" in f})
    matching = [f for f in folders if fnmatch(f, pattern)]
    if not matching:
        raise FileNotFoundError(f"repository {repo_id!r} has no folder matching {pattern!r}; "
                                f"it has {folders[:10]}{' ...' if len(folders) > 10 else ''}")
    return Path(snapshot_download(repo_id, allow_patterns=[f"{matching[0]}/*"]))
