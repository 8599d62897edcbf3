"""Finished shard outputs kept under a second name, so that a shard which Snakemake deleted links back in.

Snakemake runs the shards of a grouped job one after another in one SLURM job. When one of them fails, or the
job reaches its time limit, the main Snakemake deletes the outputs of every shard of the group, finished ones
included, and a retry runs the whole group again (its in-job Snakemake deletes each output before running it).
A stage given a keep folder hard-links each output it finishes into that folder, at the output's absolute
path, and a later run of the same shard links it back (when the output is missing and the kept copy was made
with the settings asked for now) instead of computing it again. A hard link costs no space while the output
exists; the merge of the parts forgets their copies, so temporary parts do not outlive their merge.

The workflow's main Snakemake process sets ``RCDM_FINISHED`` to a new folder ``<results>/.finished/<run>`` per
run, and every job inherits it (sbatch exports the environment): shard stages keep their outputs there, and a
merge forgets its parts' copies in every run's folder (the parent). So retries within a run restore, while a
new run, e.g. one with ``--forcerun`` after a code change, computes every shard it is asked to. An
environment variable, not an option: Snakemake reruns every job of a rule whose shell command changed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "RCDM_FINISHED"
KEEP_HELP = (
    "hard-link each finished shard output into DIR (at its absolute path) and link it back from there when a "
    "rerun finds the output deleted and the copy made with equal settings: Snakemake deletes the finished "
    f"shards of a failed group job (default: ${ENV}, which the workflow sets per run)"
)
FORGET_HELP = (
    "after merging, remove the parts' kept copies from every folder of ROOT (see --keep-finished; default: "
    f"the folder holding ${ENV})"
)


def keep_dir(given: str | os.PathLike | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """A shard's keep folder: ``given``, else ``$RCDM_FINISHED`` (this run's folder) when set."""
    if given is not None:
        return Path(given)
    return Path(environ[ENV]) if environ.get(ENV) else None


def forget_root(given: str | os.PathLike | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """A merge's folder of every run's kept copies: ``given``, else the folder holding ``$RCDM_FINISHED``."""
    if given is not None:
        return Path(given)
    return Path(environ[ENV]).parent if environ.get(ENV) else None


def kept_path(path: str | os.PathLike, keep_dir: str | os.PathLike) -> Path:
    """Where ``path``'s kept copy lives in ``keep_dir``: its absolute path, mirrored under the folder."""
    absolute = Path(os.path.abspath(path))
    return Path(keep_dir, *absolute.parts[1:])


def keep(path: str | os.PathLike, keep_dir: str | os.PathLike) -> Path:
    """Hard-link the finished output ``path`` into ``keep_dir``, replacing an older copy atomically; where
    the file system has no hard links, copy it (with a warning: the copy takes the output's space)."""
    kept = kept_path(path, keep_dir)
    if kept.exists() and os.path.samefile(kept, path):
        return kept  # already kept (a rename onto another link of the same file would do nothing)
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError as err:
        log.warning("cannot hard-link %s into %s (%s): keeping a copy instead", path, keep_dir, err)
        shutil.copyfile(path, tmp)
    os.replace(tmp, kept)
    return kept


def restore(path: str | os.PathLike, keep_dir: str | os.PathLike, matches: Callable[[Path], bool]) -> bool:
    """Link ``path``'s kept copy back when ``path`` is missing and ``matches(copy)`` (made with the settings
    asked for now); True if it did. A copy that does not match is removed: it can never be restored."""
    path = Path(path)
    kept = kept_path(path, keep_dir)
    if path.exists() or not kept.is_file():
        return False
    if not matches(kept):
        log.info("%s was kept with other settings or is broken: removed, %s is made again", kept, path)
        kept.unlink()
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(kept, path)
    except FileExistsError:
        return False
    except OSError:
        shutil.copyfile(kept, path)
    log.info("%s restored from its kept copy %s (finished in an earlier try)", path, kept)
    return True


def forget(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> int:
    """Remove the kept copies of ``paths`` from every folder of ``root``; return how many were removed.
    Folders left empty are removed too, up to ``root``'s folders."""
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    for run_dir in (d for d in root.iterdir() if d.is_dir()):
        for path in paths:
            kept = kept_path(path, run_dir)
            if kept.is_file():
                kept.unlink()
                removed += 1
                _prune(kept.parent, run_dir)
    return removed


def _prune(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, never ``stop`` or above."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
