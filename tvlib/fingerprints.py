"""Fingerprints of what a result is computed from, for cache keys: JSON-able settings
(``digest``), files and folders, tvlib's own code, a model's weights in memory. A leaf
module: it imports nothing else of tvlib but its paths.

``weights_fingerprint`` reads a model's parameters and buffers as they are in memory,
so that a model edited in place (an ablation, a patched weight, ``p.data.zero_()``,
which no version counter sees) never shares cache entries with the model its files
describe. Every bit is read, where the weights are:

- on the CPU, a CRC-32 of each tensor's bytes (zlib, no copy: about 0.5 s for Gemma 3
  270M's 1 GB on 2 cores, measured in the README's benchmarks);
- on an accelerator, two integer sums of the bits, plain and weighted by position,
  computed there in fixed-size chunks (nothing is copied to the host).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from .paths import REPO_ROOT

# the libraries whose versions are in every key: they compute
LIBRARIES = ("torch", "transformers", "tokenizers", "nnsight", "sae-lens")
_CHUNK = 1 << 24                      # elements per step on an accelerator
_PRIME = 65521                        # position weights cycle through 1 .. _PRIME - 1


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat integer tensor (same memory where it can be)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.to(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    size = flat.element_size()
    return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def device_checksum(bits: torch.Tensor) -> tuple[int, int]:
    """(sum, position-weighted sum) of integer ``bits`` in wrapping int64, computed on
    their device in chunks."""
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    weighted = torch.zeros((), dtype=torch.int64, device=bits.device)
    weights = torch.arange(1, _CHUNK + 1, device=bits.device, dtype=torch.int64) % _PRIME
    for index, start in enumerate(range(0, bits.numel(), _CHUNK)):
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        total += chunk.sum()
        weighted += (chunk * weights[:chunk.numel()]).sum() * (index + 1)
    return int(total), int(weighted)


def tensor_checksum(tensor: torch.Tensor) -> str:
    """A checksum of the tensor's dtype, shape and every bit of its values."""
    bits = _bits(tensor)
    if bits.device.type == "cpu":
        value = f"crc32:{zlib.crc32(bits.numpy().data):08x}" if bits.numel() else "empty"
    else:
        value = "sums:{}:{}".format(*device_checksum(bits))
    return f"{str(tensor.dtype).removeprefix('torch.')}{tuple(tensor.shape)}:{value}"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of every parameter's and buffer's name, dtype, shape and bits."""
    sha = hashlib.sha256()
    tensors = dict(module.named_parameters(remove_duplicate=True))
    tensors.update(module.named_buffers(remove_duplicate=True))
    for name in sorted(tensors):
        sha.update(f"{name}={tensor_checksum(tensors[name])};".encode())
    return sha.hexdigest()[:16]


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered while the file is unchanged.

    Unchanged: the same inode, size, mtime and ctime. The ctime is the one the
    tools that restore an old mtime (``cp -p``, tar, ``rsync -a``) cannot set: any
    write, replacement or ``utime`` moves it. A file in the Hugging Face hub cache
    is a link to a blob named by its content hash; that name is used without
    reading the file.
    """
    path = Path(path)
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return f"blob:{target.name}"
    stat = target.stat()
    memo = (str(target), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _FILE_DIGESTS:
        sha = hashlib.sha256()
        with open(target, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
        _FILE_DIGESTS[memo] = sha.hexdigest()
    return _FILE_DIGESTS[memo]


def folder_digest(folder: Path, exclude: tuple[str, ...] = ()) -> str:
    """A digest of every file under ``folder`` (hidden files and folders, and the names
    in ``exclude``, left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {folder}: not a folder")
    entries = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (path.is_file() and not any(part.startswith(".") for part in relative.parts)
                and str(relative) not in exclude):
            entries[str(relative)] = file_digest(path)
    if not entries:
        raise FileNotFoundError(f"cannot fingerprint {folder}: it holds no files")
    return _short(json.dumps(entries, sort_keys=True))


# Modules that never compute a cached result: figures, notebook plumbing, and the
# builders of SAEs, corpora and the embedded model (their outputs are files, which
# enter keys by their own digests). Every other tvlib module is in the code fingerprint.
NOT_COMPUTING = ("plotting.py", "notebook.py", "offline_saes.py", "prose_text.py",
                 "generated_text.py", "residual_store.py", "standins.py", "toy")


class CodeChangedError(RuntimeError):
    """A computing module changed on disk after this process imported it."""


def _source_digests(package: Path) -> dict[str, str]:
    return {str(path.relative_to(package)): file_digest(path)[:16]
            for path in sorted(package.rglob("*.py"))
            if path.relative_to(package).parts[0] not in NOT_COMPUTING}


def _loaded_files() -> set[Path]:
    return {Path(module.__file__).resolve() for module in list(sys.modules.values())
            if getattr(module, "__file__", None)}


# The computing source as this process first read it (at import): the code that runs is
# that code, whatever the disk holds later.
_AT_IMPORT: dict[Path, dict[str, str]] = {}


def code_fingerprint() -> dict[str, str]:
    """{module path: digest} of the tvlib source a cached result may be computed by: an
    edited loss, view or scoring step is a different result, never an old one.

    Refused when a module this process has imported changed on disk since: the code in
    memory would compute results stored under the key of the code on disk.
    """
    package = REPO_ROOT / "tvlib"
    now = _source_digests(package)
    first = _AT_IMPORT.setdefault(package, dict(now))
    loaded = _loaded_files()
    changed = []
    for name, digest_now in now.items():
        if first.setdefault(name, digest_now) == digest_now:
            continue
        if (package / name).resolve() in loaded:
            changed.append(name)
        else:                       # not imported yet: it will run as it is on disk now
            first[name] = digest_now
    if changed:
        raise CodeChangedError(
            f"tvlib/{', tvlib/'.join(changed)} changed on disk after this process imported "
            "it: results would be computed by the code in memory and stored under the key "
            "of the code on disk. Restart the kernel (or Python) so that the code that runs "
            "is the code on disk; after importlib.reload of every changed module, "
            "tvlib.fingerprints.code_reloaded() accepts the new code instead")
    return now


def code_reloaded() -> None:
    """Take the tvlib source on disk as the code this process runs (after reloading every
    changed module, e.g. with %autoreload)."""
    package = REPO_ROOT / "tvlib"
    _AT_IMPORT[package] = _source_digests(package)


def digest(obj) -> str:
    """A short, order-independent hash of JSON-able data (dataclasses included)."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:16]


def canonical(obj) -> str:
    """The JSON text ``obj`` is hashed from: keys sorted, dataclasses as dicts, sets sorted;
    anything else that JSON cannot hold is refused."""
    def plain(value):
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, Path):
            return str(value)
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            return value.item()            # numpy and torch scalars
        raise TypeError(f"cannot put {type(value).__name__} {value!r} into a cache key")
    return json.dumps(obj, sort_keys=True, default=plain)


code_reloaded()     # the source as imported: what this process runs
