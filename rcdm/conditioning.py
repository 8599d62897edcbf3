"""What a sample is conditioned on, and the noise it starts from.

Conditionings come from a features file (row i, index 0 = the image's representation) or from images (a
folder, ``photos``, ``shapes``) encoded on the fly exactly like extraction. Sample j of conditioning c starts
from noise drawn from a generator seeded by a hash of (seed, c, j) -- initial and per-step noise alike -- so
every sample is reproducible and independent of the number of shards and of the batch size.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rcdm.formats import hdf5


def noise_seed(seed: int, cond_index: int, sample_index: int) -> int:
    """63-bit generator seed for sample ``sample_index`` of conditioning ``cond_index`` (blake2b hash)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, cond_index, sample_index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generators(
    seed: int, cond_index: Sequence[int], sample_index: Sequence[int], device: torch.device | str
) -> list[torch.Generator]:
    """One generator per batch element, seeded by :func:`noise_seed`."""
    gens = []
    for c, s in zip(cond_index, sample_index):
        g = torch.Generator(device=device)
        g.manual_seed(noise_seed(seed, int(c), int(s)))
        gens.append(g)
    return gens


class FeatureConditioning:
    """Conditioning representations read from a features file (index 0: the unflipped image)."""

    kind = "features"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.attrs = hdf5.check_features_file(self.path, deep=False)
        self.n = int(self.attrs["num_images"])
        self.dim = int(self.attrs["dim"])
        self._h5: h5py.File | None = None

    def describe(self) -> dict[str, Any]:
        a = self.attrs
        return {
            "cond_source": "features",
            "features_file": str(self.path),
            "features_paths_sha256": a.get("paths_sha256", ""),
            "images_file": a.get("images_file", ""),
            "dataset": a.get("dataset", ""),
            "split": a.get("split", ""),
            "encoder": a.get("encoder", ""),
            "layer": a.get("layer", ""),
        }

    def features(self, ids: np.ndarray) -> torch.Tensor:
        """float32 [len(ids), D] for sorted, distinct conditioning indices ``ids``."""
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        ds = self._h5[hdf5.FEATURES]
        ids = np.asarray(ids, dtype=np.int64)
        lo, hi = int(ids[0]), int(ids[-1]) + 1
        if hi - lo <= 2 * len(ids):  # (nearly) contiguous: one slice read
            block = ds[lo:hi, 0][ids - lo]
        else:
            block = ds[ids, 0]
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))

    def cond_images(self, ids: np.ndarray) -> None:
        return None

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


class ImageConditioning:
    """Conditioning images from a dataset, cropped and encoded on the fly like extraction does."""

    kind = "images"

    def __init__(self, source, encoder: torch.nn.Module, image_size: int, device: torch.device, spec: str):
        self.source = source
        self.encoder = encoder.to(device)
        self.image_size = image_size
        self.device = device
        self.spec = spec
        self.n = len(source)
        self.dim = int(encoder.dim)
        self._cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "cond_source": "images",
            "dataset": self.spec,
            "encoder": self.encoder.encoder_name,
            "layer": self.encoder.layer,
            "encoder_input_size": int(self.encoder.input_size),
            "encoder_input_norm": self.encoder.input_norm,
        }

    def _encode(self, ids: np.ndarray) -> None:
        """Crop and encode (in one batch) those of ``ids`` not yet cached."""
        from rcdm.preprocess import center_crop_arr, encoder_input

        todo = [int(i) for i in ids if int(i) not in self._cache]
        if not todo:
            return
        if len(self._cache) + len(todo) > 4096:
            self._cache.clear()
        crops, enc_in = [], []
        for i in todo:
            image = self.source.load(i)
            crops.append(center_crop_arr(image, self.image_size))
            enc_in.append(center_crop_arr(image, self.encoder.input_size))
        x = encoder_input(torch.from_numpy(np.stack(enc_in)), self.encoder.input_norm).to(self.device)
        with torch.inference_mode():
            feats = self.encoder(x).float()
        for i, crop, feat in zip(todo, crops, feats):
            self._cache[i] = (crop, feat)

    def features(self, ids: np.ndarray) -> torch.Tensor:
        self._encode(ids)
        return torch.stack([self._cache[int(i)][1] for i in ids])

    def cond_images(self, ids: np.ndarray) -> np.ndarray:
        self._encode(ids)
        return np.stack([self._cache[int(i)][0] for i in ids])

    def close(self) -> None:
        self._cache.clear()


def select_conditionings(n: int, num_images: int | None, subset_seed: int) -> np.ndarray:
    """Sorted conditioning indices: all ``n``, or a seeded random subset of ``num_images`` of them."""
    if num_images is None or num_images >= n:
        return np.arange(n, dtype=np.int64)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return np.sort(np.random.default_rng(subset_seed).choice(n, size=num_images, replace=False)).astype(
        np.int64
    )


SEED_RULE = "blake2b-8(<qqq: seed, cond_index, sample_index>) & (2**63-1) seeds one torch.Generator per item"
