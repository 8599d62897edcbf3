"""Input file errors as one line: which file, what is wrong with it, what to do.

Stages read each input file inside :func:`reading`; the low-level errors of a missing, truncated or foreign
file (``OSError`` and h5py's, PIL's ``UnidentifiedImageError``, zip and pickle errors of ``.npz``/``.pt``
files, ``EOFError``, a ``KeyError`` for a missing dataset or column, a ``ValueError`` for a wrong shape or
kind) become an :class:`InputFileError`. ``rcdm`` (:mod:`rcdm.cli`) prints it as the one line
``rcdm <stage>: error: <path>: <problem>; <fix>`` on stderr, without a traceback, and exits with
:data:`EXIT_PERMANENT`: rerunning the same command cannot help, so a workflow must not spend retries on it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

#: exit status of a permanent error (bad input file, bad configuration): the value ``rcdm train`` documents
#: for "bad configuration or data" (75 there means "stopped after saving: rerun to continue")
EXIT_PERMANENT = 1

#: what to do about a broken intermediate file that a workflow job (or an rcdm command) wrote
REMAKE = "delete it and rerun (Snakemake makes it again; outside Snakemake, rerun the command that wrote it)"
#: what to do about an input that does not exist
MAKE_FIRST = "check the path, or make that file first (Snakemake makes it before this job)"
#: weight files: published ones `rcdm fetch` downloads, an encoder `rcdm pretrain` made
REFETCH = (
    "delete it and get it again (`rcdm fetch` downloads published weights; Snakemake remakes a pretrained "
    "encoder), or fix the path"
)

#: errors that reading a file raises when it is missing, truncated or not what it should be
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, KeyError, ValueError, IndexError, zipfile.BadZipFile, pickle.UnpicklingError,
)  # fmt: skip
#: of those, the ones rcdm's own code also raises for a bad setting: a file error only when raised by a
#: file reader (h5py, numpy, json, zipfile, pandas, PIL, torch) or when the message names the file
_AMBIGUOUS = (KeyError, ValueError, IndexError)

_MAX_PROBLEM = 400


class InputFileError(Exception):
    """An input file that is missing or cannot be used; ``str`` is one line ``"<path>: <problem>; <fix>"``."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        self.fix = _one_line(fix)
        super().__init__(f"{self.path}: {self.problem}; {self.fix}")

    def __reduce__(self):  # picklable (DataLoader workers, multiprocessing)
        return type(self), (self.path, self.problem, self.fix)


def _one_line(text: str) -> str:
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())  # no terminal colour codes
    return line if len(line) <= _MAX_PROBLEM else line[: _MAX_PROBLEM - 3] + "..."


def _message(err: BaseException) -> str:
    """The error's own message (a KeyError's without its quotes), first line only."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err) or type(err).__name__
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _spellings(path: str | os.PathLike) -> list[str]:
    return sorted({str(path), str(Path(path)), os.path.abspath(path)}, key=len, reverse=True)


def describe(err: BaseException, path: str | os.PathLike) -> str:
    """What is wrong with ``path``, from the error reading it: the message with the path taken off when the
    error names it (the format checks of :mod:`rcdm.formats` do), else the error's type and message."""
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    msg = _message(err)
    for spelled in _spellings(path):
        for prefix in (f"{spelled}: ", f"{spelled} "):
            if msg.startswith(prefix):
                return msg[len(prefix) :]
    for spelled in _spellings(path):
        if spelled in msg:
            return msg.replace(spelled, "it")
    reader = _READERS.get(_raised_in(err)) if isinstance(err, (OSError, zipfile.BadZipFile)) else None
    return f"{reader} ({msg})" if reader else f"cannot be read ({type(err).__name__}: {msg})"


#: how a file reader's failure to open a file is described, by the package it comes from
_READERS = {"h5py": "not a readable HDF5 file", "zipfile": "not a readable zip archive"}


def _raised_in(err: BaseException) -> str:
    """The top-level package of the innermost frame of the error's traceback ("" when unknown)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]


def _raised_by_rcdm(err: BaseException) -> bool:
    """Whether the error comes from rcdm's own code (not from a file reader)."""
    return _raised_in(err) == "rcdm"


def _named(err: BaseException, paths: list[str]) -> str | None:
    """The path among ``paths`` the error names first in its message, if any."""
    msg = _message(err)
    hits = [(msg.find(s), p) for p in paths for s in _spellings(p) if s in msg]
    return min(hits)[1] if hits else None


@contextlib.contextmanager
def reading(
    *paths: str | os.PathLike | None,
    fix: str = REMAKE,
    missing_fix: str = MAKE_FIRST,
    keep: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Within the block, an error reading ``paths`` (:data:`READ_ERRORS`) becomes an :class:`InputFileError`.

    The file it concerns: the one the error message names first, else the first that does not exist, else
    (when the error comes from a file reader, not from rcdm's own checks of a setting) the only path given;
    otherwise the error is not about a file and propagates unchanged. A missing file gets ``missing_fix``,
    any other problem ``fix``. ``keep``: error types that propagate unchanged. Keep the block to the reads.
    """
    given = [str(p) for p in paths if p is not None and str(p) != ""]
    try:
        yield
    except InputFileError:
        raise
    except keep:
        raise
    except READ_ERRORS as err:
        if not given:
            raise
        path = _named(err, given) or next((p for p in given if not os.path.exists(p)), None)
        if path is None and len(given) == 1 and not (isinstance(err, _AMBIGUOUS) and _raised_by_rcdm(err)):
            path = given[0]
        if path is None:
            raise
        if not os.path.exists(path):
            raise InputFileError(path, "not found", missing_fix) from err
        raise InputFileError(path, describe(err, path), fix) from err


#: ``--check`` of a stage: every input opened with the stage's own readers and every setting checked, on the
#: CPU, nothing written; a workflow runs it on the submit host before the (retried, GPU) job
CHECK_HELP = (
    "validate every input file and setting as the real run would (on the CPU, writing nothing), print one "
    "line and exit: 0 when the run can start, 1 with the error otherwise"
)


def check_passed(stage: str, summary: str) -> int:
    """Print the one line a passing ``rcdm <stage> --check`` ends with (on stderr); returns exit status 0."""
    print(f"rcdm {stage}: check passed: {_one_line(summary)}", file=sys.stderr)
    return 0
