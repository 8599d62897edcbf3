"""Kept copies of finished shards (rcdm.finished): what a grouped SLURM job's retry links back."""

import os

import pytest

from rcdm import finished


def test_keep_restore_forget_round_trip(tmp_path):
    out = tmp_path / "results" / "samples.part-0001-of-0004.h5"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"finished shard")
    run = tmp_path / ".finished" / "run-a"
    kept = finished.keep(out, run)
    assert kept == run / os.path.abspath(out).lstrip("/")  # the output's absolute path, under the folder
    assert os.path.samefile(kept, out) and out.stat().st_nlink == 2  # a hard link: no second copy
    finished.keep(out, run)  # keeping again replaces the link, leaves no temporary file
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]

    out.unlink()  # what Snakemake does to the finished shards of a failed group job
    assert finished.restore(out, run, lambda path: path == kept)
    assert out.read_bytes() == b"finished shard" and os.path.samefile(kept, out)
    assert not finished.restore(out, run, lambda path: True)  # present: nothing to do

    out.unlink()
    assert not finished.restore(out, run, lambda path: False)  # made with other settings: removed
    assert not out.exists() and not kept.exists()
    assert not finished.restore(out, run, lambda path: True)  # nothing kept


def test_forget_removes_the_copies_of_every_run_and_their_empty_folders(tmp_path):
    parts = [tmp_path / "f" / f"trunk.part-000{i}-of-0002.h5" for i in range(2)]
    other = tmp_path / "g" / "head.part-0000-of-0002.h5"
    for path in (*parts, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(path.name.encode())
    root = tmp_path / ".finished"
    finished.keep(parts[0], root / "run-a")
    finished.keep(parts[1], root / "run-b")
    kept_other = finished.keep(other, root / "run-b")
    assert finished.forget(parts, root) == 2
    assert not finished.kept_path(parts[0], root / "run-a").exists()
    assert not finished.kept_path(parts[1], root / "run-b").parent.exists()  # emptied folders go
    assert kept_other.exists() and (root / "run-a").is_dir()  # not the runs' folders themselves
    assert finished.forget(parts, root) == 0
    assert finished.forget(parts, tmp_path / "none") == 0


@pytest.mark.parametrize(
    ("given", "environ", "keep", "root"),
    [
        (None, {}, None, None),
        (None, {"RCDM_FINISHED": "/r/.finished/run"}, "/r/.finished/run", "/r/.finished"),
        ("/mine", {"RCDM_FINISHED": "/r/.finished/run"}, "/mine", "/mine"),
    ],
)
def test_keep_folder_of_this_run_from_the_environment(given, environ, keep, root):
    assert finished.keep_dir(given, environ) == (None if keep is None else finished.Path(keep))
    assert finished.forget_root(given, environ) == (None if root is None else finished.Path(root))
