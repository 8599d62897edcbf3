"""Small file helpers shared by every stage: atomic writes, hashing, safe ``torch.load``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rcdm.errors import InputFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed or failing writer therefore never leaves a file under the final name that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared on clusters
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class UnsafeCheckpointError(InputFileError, RuntimeError):
    """A checkpoint needs arbitrary code to be unpickled and was not explicitly trusted."""


#: how a file ``torch.save`` wrote starts: a zip archive (since torch 1.6) or a pickle (older)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def safe_torch_load(path: str | os.PathLike, trust: bool = False, map_location: str = "cpu"):
    """``torch.load`` with ``weights_only=True``; code-needing files refused unless ``trust``.

    Missing files raise ``FileNotFoundError`` naming the path.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: empty file (0 bytes)")
    if not head.startswith(_TORCH_MAGIC):
        raise ValueError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except RuntimeError as err:  # torch's zip reader on a truncated or damaged archive
        if "PytorchStreamReader" not in str(err):
            raise
        raise ValueError(f"{path}: truncated or damaged ({str(err).split('. ')[0]})") from err
    except pickle.UnpicklingError as err:
        if not trust:
            raise UnsafeCheckpointError(
                path,
                "cannot be loaded with torch.load(weights_only=True): it needs to unpickle code "
                f"({str(err).splitlines()[0]})",
                "only if you trust its source, opt in explicitly: trust=True (Python) / --trust-checkpoint "
                "(CLI) / `trust_checkpoints: true` (config)",
            ) from err
        return torch.load(path, map_location=map_location, weights_only=False)
