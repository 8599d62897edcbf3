"""Study 7, manipulation, as the published RCDM script does it.

For a source image: find its ``--neighbours`` nearest neighbours (cosine similarity of L2-normalised
representations, which orders exactly as the published L2 search on normalised embeddings) in a features file
or an image folder; a dimension is *shared* when it is active (``|value| > --active-threshold``; the published
script uses "non-zero", i.e. threshold 0) in more than ``--n-common`` neighbours. Three conditionings are then
sampled with the same noise: the source's representation, the same with the shared dimensions set to zero, and
the same with the shared dimensions replaced by a target image's values.

The neighbour search is exact and batched: the database is streamed in blocks and a running top-k is kept
(torch.topk on each block's similarities), so memory is bounded by the block size. With faiss installed, large
databases (``--faiss auto``: over 200,000 vectors) use its exact inner-product index instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from rcdm.figures import as_tiles, labelled_table
from rcdm.formats import hdf5
from rcdm.representations import cosine_distance, encode_images
from rcdm.stages.study import common

NAME = "manipulate"
FAISS_MIN_SIZE = 200_000
VARIANTS = ("original", "shared dims zeroed", "shared dims <- target")


def nearest_neighbours(
    queries: torch.Tensor,
    database: torch.Tensor | Iterable[torch.Tensor],
    k: int,
    *,
    block_size: int = 65536,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours of each query: (similarities [Q, k] descending, indices [Q, k]).

    ``database`` is a [N, D] tensor or an iterable of [B_i, D] blocks (streamed, e.g. from HDF5); indices
    count rows across blocks. Vectors are L2-normalised; similarities are accumulated in float32.
    """
    device = torch.device(device) if device is not None else queries.device
    q = F.normalize(queries.to(device, torch.float32), dim=-1)
    if isinstance(database, torch.Tensor):
        blocks: Iterable[torch.Tensor] = (
            database[i : i + block_size] for i in range(0, len(database), block_size)
        )
    else:
        blocks = database
    best_s = torch.full((len(q), 0), -float("inf"), device=device)
    best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
    offset = 0
    for block in blocks:
        b = F.normalize(torch.as_tensor(block).to(device, torch.float32), dim=-1)
        if b.ndim != 2 or b.shape[1] != q.shape[1]:
            raise ValueError(f"database block {tuple(b.shape)} does not match queries of dim {q.shape[1]}")
        sims = q @ b.T
        idx = torch.arange(offset, offset + len(b), device=device).expand(len(q), -1)
        all_s, all_i = torch.cat([best_s, sims], 1), torch.cat([best_i, idx], 1)
        top = torch.topk(all_s, min(k, all_s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(all_i, 1, top.indices)
        offset += len(b)
    if offset < k:
        raise ValueError(f"asked for {k} neighbours but the database has only {offset} vectors")
    return best_s, best_i


def nearest_neighbours_faiss(
    queries: torch.Tensor, database: np.ndarray, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same exact search with faiss (IndexFlatIP on normalised vectors)."""
    import faiss

    db = np.ascontiguousarray(database, dtype=np.float32)
    faiss.normalize_L2(db)
    q = np.ascontiguousarray(F.normalize(queries.float(), dim=-1).cpu().numpy())
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    sims, idx = index.search(q, k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def shared_dimensions(neighbour_feats: torch.Tensor, n_common: int, threshold: float = 0.0) -> torch.Tensor:
    """Indices of dimensions active (``|x| > threshold``) in more than ``n_common`` neighbours [K, D]."""
    counts = (neighbour_feats.abs() > threshold).sum(0)
    return torch.nonzero(counts > n_common).flatten()


def manipulate(
    feat: torch.Tensor, target: torch.Tensor, dims: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``feat`` with ``dims`` zeroed, ``feat`` with ``dims`` taken from ``target``)."""
    zeroed, replaced = feat.clone(), feat.clone()
    zeroed[..., dims] = 0
    replaced[..., dims] = target[..., dims]
    return zeroed, replaced


def h5_feature_blocks(path: str | Path, block_size: int = 65536) -> Iterator[torch.Tensor]:
    """Stream ``features[:, 0]`` (the un-mirrored images) of a features file in blocks."""
    path = Path(path)
    hdf5.check_features_file(path, deep=False)
    with h5py.File(path, "r") as f:
        ds = f[hdf5.FEATURES]
        for i in range(0, ds.shape[0], block_size):
            block = torch.from_numpy(np.asarray(ds[i : i + block_size, 0], dtype=np.float32))
            if not torch.isfinite(block).all():
                raise ValueError(
                    f"{path}: features rows {i}..{i + len(block)} contain NaN or infinite values"
                )
            yield block


def feature_rows(path: str | Path, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``features[rows, 0]`` of a features file as float32 [len(rows), D]."""
    with h5py.File(path, "r") as f:
        return torch.from_numpy(hdf5.read_rows(f[hdf5.FEATURES], np.asarray(rows))[:, 0].astype(np.float32))


def encode_folder(ctx: common.StudyContext, folder: str) -> torch.Tensor:
    """Representations [N, D] of every image of a folder (encoder input: centre crop at its size)."""
    from tqdm import tqdm

    from rcdm.data import open_dataset
    from rcdm.preprocess import center_crop_arr

    source = open_dataset(folder)
    size = int(ctx.encoder.input_size)
    out, batch = [], []
    for i in tqdm(range(len(source)), desc="encoding neighbours", disable=not ctx.settings.progress):
        batch.append(center_crop_arr(source.load(i), size))
        if len(batch) == ctx.settings.batch_size or i == len(source) - 1:
            out.append(encode_images(ctx.encoder, np.stack(batch), ctx.settings.batch_size))
            batch = []
    return torch.cat(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_standard_arguments(parser, samples=4)
    parser.set_defaults(num_images=2)
    g = parser.add_argument_group("manipulation")
    g.add_argument(
        "--pairs",
        default=None,
        help="'source-target' image positions, e.g. '0-1,1-0' (default 0-1, 2-3, ...)",
    )
    g.add_argument("--neighbour-features", default=None, help="features file to search (default: --features)")
    g.add_argument("--neighbour-folder", default=None, help="image folder to search instead (encoded here)")
    g.add_argument("--neighbours", type=int, default=20, help="nearest neighbours (published: 20)")
    g.add_argument(
        "--n-common", type=int, default=14, help="shared = active in more than this many (published: 14)"
    )
    g.add_argument(
        "--active-threshold", type=float, default=0.0, help="active = |value| above this (published: 0)"
    )
    g.add_argument(
        "--faiss", choices=("auto", "yes", "no"), default="auto", help="use faiss (when installed)"
    )


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def effective_neighbours(n_database: int, neighbours: int, n_common: int) -> tuple[int, int]:
    """(k, n_common) for a database of ``n_database`` vectors: all of them when fewer than ``neighbours``,
    with ``n_common`` scaled by the same ratio (the published 14 of 20 is "shared by more than 70 %")."""
    if n_database < 1:
        raise ValueError("the neighbour set is empty")
    if n_database >= neighbours:
        return neighbours, n_common
    k = n_database
    scaled = n_common * k // neighbours
    print(
        f"manipulate: only {k} vectors to search: using {k} neighbours and --n-common {scaled} "
        f"(scaled from {n_common} of {neighbours})",
        file=sys.stderr,
    )
    return k, scaled


def _search(args: argparse.Namespace, ctx: common.StudyContext, queries: torch.Tensor):
    """((similarities, indices), fetch rows by index, k, n_common) over the chosen neighbour set."""
    if args.neighbour_folder:
        db = encode_folder(ctx, args.neighbour_folder)
        k, n_common = effective_neighbours(len(db), args.neighbours, args.n_common)
        return nearest_neighbours(queries, db, k, device=ctx.device), lambda idx: db[idx.cpu()], k, n_common
    path = args.neighbour_features or args.features
    if not path:
        raise ValueError(
            "manipulation needs a neighbour set: --neighbour-features, --neighbour-folder or --features"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"neighbour features file not found: {path}")
    n = int(hdf5.check_features_file(path, deep=False)["num_images"])
    k, n_common = effective_neighbours(n, args.neighbours, args.n_common)
    use_faiss = args.faiss == "yes" or (args.faiss == "auto" and n >= FAISS_MIN_SIZE and _faiss_available())
    if use_faiss:
        db = torch.cat(list(h5_feature_blocks(path))).numpy()
        result = nearest_neighbours_faiss(queries, db, k)
    else:
        result = nearest_neighbours(queries, h5_feature_blocks(path), k, device=ctx.device)
    return result, lambda idx: feature_rows(path, idx.cpu()), k, n_common


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    if not 0 <= args.n_common < args.neighbours:
        raise ValueError(
            f"--n-common must be in [0, --neighbours) = [0, {args.neighbours}), got {args.n_common}"
        )
    ctx = common.StudyContext.from_args(args)
    feats = ctx.clean_features()
    pairs = common.parse_pairs(args.pairs, len(ctx.sources))
    queries = torch.stack([feats[i] for i, _ in pairs])
    (sims, idx), fetch, n_neigh, n_common = _search(args, ctx, queries)
    if fetch(idx[0, :1]).shape[1] != feats.shape[1]:
        raise ValueError("the neighbour set's representations do not have the encoder's dimension")
    shared = [shared_dimensions(fetch(idx[p]), n_common, args.active_threshold) for p in range(len(pairs))]
    conds = manipulated_conditionings(feats, pairs, shared)
    samples = ctx.repeat_samples(conds, args.samples, desc="manipulation")
    search = {"sims": sims, "idx": idx, "n_neighbours": n_neigh, "n_common": n_common}
    rows = _rows(ctx, feats, pairs, shared, conds, samples, search, args.samples)
    title = f"Manipulation ({ctx.describe()}): dims active in >{n_common} of {n_neigh} neighbours"
    out.save_png(_figure(ctx, pairs, shared, samples, args.samples, title))
    out.save_csv(rows)
    return []


def manipulated_conditionings(feats: torch.Tensor, pairs, shared: list[torch.Tensor]) -> torch.Tensor:
    """Per pair (source i, target j): i's representation, with its shared dims zeroed, with them taken
    from j: [3 * len(pairs), D] in that order."""
    conds = []
    for (i, j), dims in zip(pairs, shared):
        zeroed, replaced = manipulate(feats[i], feats[j], dims)
        conds += [feats[i], zeroed, replaced]
    return torch.stack(conds)


def _rows(ctx: common.StudyContext, feats, pairs, shared, conds, samples, search: dict, k: int) -> list:
    """Per pair, variant and sample: the neighbour search and the distances of the sample to both images."""
    src = ctx.sources
    emb = ctx.embed_samples(samples)
    rows = []
    for c, variant in enumerate(VARIANTS * len(pairs)):
        p = c // 3
        i, j = pairs[p]
        for n in range(k):
            r = c * k + n
            rows.append(
                {
                    "pair": p,
                    "source": src.names[i],
                    "target": src.names[j],
                    "variant": variant,
                    "sample": n,
                    "n_neighbours": search["n_neighbours"],
                    "n_common": search["n_common"],
                    "n_shared_dims": len(shared[p]),
                    "dim": feats.shape[1],
                    "cond_cos_dist_source": float(cosine_distance(conds[c], feats[i])),
                    "sample_cos_dist_source": float(cosine_distance(emb[r], feats[i])),
                    "sample_cos_dist_target": float(cosine_distance(emb[r], feats[j])),
                    "neighbour_indices": " ".join(str(int(v)) for v in search["idx"][p]),
                    "neighbour_min_cos": float(search["sims"][p, -1]),
                }
            )
    return rows


def _figure(ctx: common.StudyContext, pairs, shared, samples, k: int, title: str):
    src = ctx.sources
    imgs = as_tiles(samples)
    fig_rows, labels = [], []
    for c, variant in enumerate(VARIANTS * len(pairs)):
        p = c // 3
        i, j = pairs[p]
        first = src.show[i] if c % 3 == 0 else (src.show[j] if c % 3 == 2 else None)
        fig_rows.append([first, *imgs[c * k : (c + 1) * k]])
        labels.append(f"{src.names[i]} / {src.names[j]}\n{variant}\n({len(shared[p])} dims)")
    cols = ["input", *[f"sample {n + 1}" for n in range(k)]]
    return labelled_table(fig_rows, labels, cols, title)
