"""Training data: (image, representation) pairs streamed from the extraction stage's HDF5 files.

Each training step reads one global batch, chosen by a permutation of the dataset that depends only on
``(seed, epoch)``; a rank reads its own contiguous slice of that batch, so the data order is the same for any
number of processes and a resumed run reads exactly what an uninterrupted one would. A random horizontal flip,
also fixed by ``(seed, epoch)``, mirrors the image and selects the mirrored image's representation (index 1 of
``features``), keeping image and representation consistent. Batches travel as uint8 NHWC (4x less host->device
traffic than float) and become [-1, 1] float NCHW on the device (:func:`to_model_images`).

The HDF5 handles are opened lazily, in whichever process reads (each DataLoader worker after fork).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rcdm.formats import hdf5


class H5PairDataset(Dataset):
    """Images (uint8 [N, S, S, 3]) and their representations (float [N, 2, D]) from an extraction's files.

    An item is a batch: ``(indices, flips)`` arrays -> ``(images uint8 [b, S, S, 3], feats float32 [b, D])``.
    """

    def __init__(
        self, images_path: str | os.PathLike, features_path: str | os.PathLike, deep_check: bool = False
    ):
        self.images_path = Path(images_path)
        self.features_path = Path(features_path)
        for path, what in ((self.images_path, "images"), (self.features_path, "features")):
            if not path.is_file():
                raise FileNotFoundError(f"{what} file not found: {path}")
        img_attrs = hdf5.check_images_file(self.images_path, deep=deep_check)
        feat_attrs = hdf5.check_features_file(self.features_path, self.images_path, deep=deep_check)
        self.images_attrs, self.features_attrs = img_attrs, feat_attrs
        self.num_images = int(img_attrs["num_images"])
        self.image_size = int(img_attrs["image_size"])
        self.feature_dim = int(feat_attrs["dim"])
        self.encoder = str(feat_attrs.get("encoder", ""))
        self.layer = str(feat_attrs.get("layer", ""))
        if self.num_images == 0:
            raise ValueError(f"{self.images_path} holds no images")
        self._handles: tuple[h5py.File, h5py.File] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = None, None  # h5py handles must not cross a fork/pickle
        return state

    def _files(self) -> tuple[h5py.File, h5py.File]:
        if self._handles is None or self._pid != os.getpid():
            self._handles = (h5py.File(self.images_path, "r"), h5py.File(self.features_path, "r"))
            self._pid = os.getpid()
        return self._handles

    def close(self) -> None:
        if self._handles is not None and self._pid == os.getpid():
            for f in self._handles:
                f.close()
        self._handles, self._pid = None, None

    def read(self, indices: np.ndarray, flips: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices``, mirrored where ``flips``: ``(uint8 [b, S, S, 3], float32 [b, D])``."""
        indices = np.asarray(indices, dtype=np.int64)
        flips = np.zeros(len(indices), dtype=bool) if flips is None else np.asarray(flips, dtype=bool)
        img_file, feat_file = self._files()
        images = hdf5.read_rows(img_file[hdf5.IMAGES], indices)
        feats = hdf5.read_rows(feat_file[hdf5.FEATURES], indices)  # [b, 2, D]
        images[flips] = images[flips, :, ::-1]
        chosen = feats[np.arange(len(indices)), flips.astype(np.int64)]
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(chosen.astype(np.float32))

    def __getitem__(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(item, tuple):
            return self.read(*item)
        return self.read(np.asarray([item]))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore SIGTERM/SIGUSR1 in workers.

    A preemption signal sent to every process of a job step then reaches the trainer (which finishes the step
    and saves) without killing its data workers first.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def to_model_images(
    images: torch.Tensor, device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S] in [-1, 1] on ``device`` (x / 127.5 - 1, as published)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class StepBatchSampler(Sampler):
    """Yields this rank's ``(indices, flips)`` for every training step in ``[start_step, stop_step)``.

    Global batch ``k`` of epoch ``e`` is ``perm_e[k*B:(k+1)*B]`` with ``perm_e`` a permutation drawn from
    ``(seed, e)``; the last incomplete batch of an epoch is dropped. Rank ``r`` of ``W`` gets the ``r``-th of
    ``W`` equal slices.
    """

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        stop_step: int | None = None,
        random_flip: bool = True,
    ):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} must be a positive multiple of world size {world_size}"
            )
        if num_items < global_batch:
            raise ValueError(
                f"the dataset has {num_items} items, fewer than one global batch of {global_batch}"
            )
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.start_step, self.stop_step, self.random_flip = start_step, stop_step, random_flip
        self.steps_per_epoch = num_items // global_batch
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(permutation of all items, flip flag per position)`` of one epoch."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_items)
            flips = rng.random(self.num_items) < 0.5 if self.random_flip else np.zeros(self.num_items, bool)
            self._cached = (epoch, perm, flips)
        return self._cached[1], self._cached[2]

    def batch_for_step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm, flips = self.epoch_order(epoch)
        local = self.global_batch // self.world_size
        lo = k * self.global_batch + self.rank * local
        return perm[lo : lo + local], flips[lo : lo + local]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield self.batch_for_step(step)
            step += 1

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("an unbounded StepBatchSampler has no length")
        return max(0, self.stop_step - self.start_step)
