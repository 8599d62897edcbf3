"""Study 7, manipulation, as the published RCDM script does it.

For a source image: find its ``--neighbours`` nearest neighbours (cosine similarity of L2-normalised
representations, which orders exactly as the published L2 search on normalised embeddings) in a features file
or an image folder, among the images of its own class when the images and the neighbour set have labels (the
published script searches the image's class folder; ``--neighbours-from all`` searches everything); a
dimension is *shared* when it is active (``|value| > --active-threshold``) in more than ``--n-common``
neighbours. Three conditionings are then sampled with the same noise: the source's representation, the same
with the shared dimensions set to zero, and the same with the shared dimensions replaced by a target image's
values.

"Active": the published script runs on the trunk (``--layer trunk``, the default) and means "non-zero"
(threshold 0), which is what ``--active-threshold auto`` (the default) uses whenever the neighbours' vectors
have exact zeros, as ReLU features do. A projector head has none: with threshold 0 every dimension would be
shared and the study degenerate, so ``auto`` then counts a value as active when its ``|value|`` exceeds the
median ``|value|`` of the neighbours' vectors, and an explicit 0 is refused. The CSV records the scope of the
search and the threshold used for each pair.

The neighbour search is exact and batched: the database is streamed in blocks and a running top-k is kept
(torch.topk on each block's similarities), so memory is bounded by the block size. With faiss installed, large
databases (``--faiss auto``: over 200,000 vectors) use its exact inner-product index instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from rcdm.errors import MAKE_FIRST, InputFileError, reading
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


def encode_folder(ctx: common.StudyContext, folder: str) -> tuple[torch.Tensor, np.ndarray]:
    """(representations [N, D], labels [N]) of every image of a folder (encoder input: centre crop at its
    size; labels: the class folder's index, -1 for loose images)."""
    from tqdm import tqdm

    from rcdm.data import open_dataset_input
    from rcdm.preprocess import center_crop_arr

    source = open_dataset_input(folder, option="--neighbour-folder")
    size = int(ctx.encoder.input_size)
    out, batch = [], []
    for i in tqdm(range(len(source)), desc="encoding neighbours", disable=not ctx.settings.progress):
        batch.append(center_crop_arr(source.load(i), size))
        if len(batch) == ctx.settings.batch_size or i == len(source) - 1:
            out.append(encode_images(ctx.encoder, np.stack(batch), ctx.settings.batch_size))
            batch = []
    return torch.cat(out), np.asarray([source.label(i) for i in range(len(source))], np.int64)


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
    g.add_argument(
        "--neighbour-images",
        default=None,
        help="its images file, for the labels (default: --images for --features, else the file the "
        "features record)",
    )
    g.add_argument("--neighbour-folder", default=None, help="image folder to search instead (encoded here)")
    g.add_argument(
        "--neighbours-from",
        choices=("class", "all"),
        default="class",
        help="search the source image's class only (published: its class folder) when labels exist, or all",
    )
    g.add_argument("--neighbours", type=int, default=20, help="nearest neighbours (published: 20)")
    g.add_argument(
        "--n-common", type=int, default=14, help="shared = active in more than this many (published: 14)"
    )
    g.add_argument(
        "--active-threshold",
        default="auto",
        help="active = |value| above this; auto: 0 (the published 'non-zero') when the neighbours' vectors "
        "have exact zeros (ReLU trunks), else their median |value| (heads); 0 on a layer without exact "
        "zeros is refused (every dimension would be shared)",
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


def active_threshold(neighbour_feats: torch.Tensor, setting: str | float, what: str = "") -> float:
    """The ``|value|`` above which a dimension counts as active in a neighbour's vector.

    ``"auto"``: 0 (the published "non-zero") when the neighbours' vectors have exact zeros, as ReLU trunk
    features do; otherwise (projector heads: nothing is ever exactly zero) the median ``|value|`` over the
    neighbours, so "active" means "among the larger half". A threshold of 0 on vectors without exact zeros
    is refused: every dimension would be active everywhere, hence shared, and the manipulation degenerate
    (a zero vector, a copy of the target).
    """
    has_zeros = bool((neighbour_feats == 0).any())
    if setting == "auto":
        return 0.0 if has_zeros else float(neighbour_feats.abs().median())
    threshold = float(setting)
    if threshold <= 0 and not has_zeros:
        raise ValueError(
            f"manipulate: the neighbours' representations{what} have no exact zeros (not a ReLU output, "
            "e.g. a projector head), so with --active-threshold 0 every dimension is active in every "
            "neighbour, all are 'shared', and the manipulation degenerates to a zero vector / a copy of "
            "the target. "
            "The published study runs on the trunk (--layer trunk); for this layer use --active-threshold "
            "auto (the neighbours' median |value|) or a positive threshold"
        )
    return threshold


def _parse_threshold(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"--active-threshold must be 'auto' or a number, got {text!r}") from err
    if not value >= 0:
        raise ValueError(f"--active-threshold must be non-negative, got {text!r}")
    return value


@dataclass
class NeighbourSet:
    """The representations to search: ``n`` rows, fetched by ``rows(indices)`` or streamed by
    ``blocks()``, with class ``labels`` [n] when known (None otherwise)."""

    n: int
    rows: Callable[[np.ndarray], torch.Tensor]
    blocks: Callable[[], Iterable[torch.Tensor]]
    labels: np.ndarray | None
    path: str | None = None  # a features file (faiss reads it whole)


@dataclass
class Neighbours:
    """One query's ``k`` nearest neighbours: similarities, rows in the set, their vectors, and the scope
    searched (``class <label>`` or ``all``); ``n_common`` scaled with ``k`` (:func:`effective_neighbours`)."""

    sims: torch.Tensor
    idx: torch.Tensor
    feats: torch.Tensor
    n_common: int
    scope: str


def neighbour_set(args: argparse.Namespace, ctx: common.StudyContext) -> NeighbourSet:
    """The neighbour set the options name, with its labels when an images file or the folder gives them."""
    if args.neighbour_folder:
        db, labels = encode_folder(ctx, args.neighbour_folder)
        return NeighbourSet(len(db), lambda i: db[torch.as_tensor(i)], lambda: [db], _known(labels))
    path = args.neighbour_features or args.features
    if not path:
        raise ValueError(
            "manipulation needs a neighbour set: --neighbour-features, --neighbour-folder or --features"
        )
    if not Path(path).is_file():
        raise InputFileError(path, "neighbour features file not found", MAKE_FIRST)
    with reading(path):
        attrs = hdf5.check_features_file(path, deep=False)
    images = args.neighbour_images or (args.images if path == args.features else attrs.get("images_file"))
    labels = None
    if images and Path(images).is_file():
        with reading(path, images):
            hdf5.check_features_file(path, images, deep=False)  # the rows must pair up
            with h5py.File(images, "r") as f:
                labels = _known(np.asarray(f[hdf5.LABELS][:], np.int64))
    return NeighbourSet(
        int(attrs["num_images"]),
        lambda i: feature_rows(path, i),
        lambda: h5_feature_blocks(path),
        labels,
        path,
    )


def _known(labels: np.ndarray) -> np.ndarray | None:
    return labels if (labels >= 0).any() else None


def find_neighbours(args, ctx: common.StudyContext, nset: NeighbourSet, queries, query_labels) -> list:
    """Each query's :class:`Neighbours`: within its class when ``--neighbours-from class`` and both it and
    the set have labels (the class's rows are read and searched in memory), else over the whole set
    (streamed; with faiss for large sets), the unrestricted queries in one pass."""
    found: list[Neighbours | None] = [None] * len(queries)
    everywhere = []
    for q, label in enumerate(query_labels):
        if args.neighbours_from == "class" and nset.labels is not None and label >= 0:
            members = np.flatnonzero(nset.labels == label)
            k, n_common = effective_neighbours(len(members), args.neighbours, args.n_common)
            db = nset.rows(members)
            sims, idx = nearest_neighbours(queries[q : q + 1], db, k, device=ctx.device)
            local = idx[0].cpu()
            found[q] = Neighbours(
                sims[0].cpu(), torch.as_tensor(members)[local], db[local], n_common, f"class {label}"
            )
        else:
            everywhere.append(q)
    if everywhere:
        k, n_common = effective_neighbours(nset.n, args.neighbours, args.n_common)
        use_faiss = args.faiss == "yes" or (
            args.faiss == "auto" and nset.path and nset.n >= FAISS_MIN_SIZE and _faiss_available()
        )
        sub = queries[everywhere]
        if use_faiss:
            sims, idx = nearest_neighbours_faiss(sub, torch.cat(list(nset.blocks())).numpy(), k)
        else:
            sims, idx = nearest_neighbours(sub, nset.blocks(), k, device=ctx.device)
        for row, q in enumerate(everywhere):
            i = idx[row].cpu()
            found[q] = Neighbours(sims[row].cpu(), i, nset.rows(i.numpy()), n_common, "all")
    return found


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    if not 0 <= args.n_common < args.neighbours:
        raise ValueError(
            f"--n-common must be in [0, --neighbours) = [0, {args.neighbours}), got {args.n_common}"
        )
    setting = _parse_threshold(args.active_threshold)
    ctx = common.StudyContext.from_args(args)
    feats = ctx.clean_features()
    pairs = common.parse_pairs(args.pairs, len(ctx.sources))
    queries = torch.stack([feats[i] for i, _ in pairs])
    nset = neighbour_set(args, ctx)
    common.loaded(args, ctx, f"{len(pairs)} pairs, {nset.n} neighbours")
    found = find_neighbours(args, ctx, nset, queries, [int(ctx.sources.labels[i]) for i, _ in pairs])
    if found[0].feats.shape[1] != feats.shape[1]:
        raise ValueError("the neighbour set's representations do not have the encoder's dimension")
    thresholds = [
        active_threshold(nb.feats, setting, f" of image {ctx.sources.names[i]} ({ctx.encoder.layer})")
        for nb, (i, _) in zip(found, pairs)
    ]
    shared = [shared_dimensions(nb.feats, nb.n_common, t) for nb, t in zip(found, thresholds)]
    conds = manipulated_conditionings(feats, pairs, shared)
    samples = ctx.repeat_samples(conds, args.samples, desc="manipulation")
    rows = _rows(ctx, feats, pairs, shared, conds, samples, found, thresholds, args.samples)
    scopes = "/".join(sorted({nb.scope.split(" ")[0] for nb in found}))
    title = (
        f"Manipulation ({ctx.describe()}): dims active in >{found[0].n_common} of {len(found[0].idx)} "
        f"neighbours (from {scopes})"
    )
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


def _rows(ctx: common.StudyContext, feats, pairs, shared, conds, samples, found, thresholds, k: int) -> list:
    """Per pair, variant and sample: the neighbour search and the distances of the sample to both images."""
    src = ctx.sources
    emb = ctx.embed_samples(samples)
    rows = []
    for c, variant in enumerate(VARIANTS * len(pairs)):
        p = c // 3
        i, j = pairs[p]
        nb = found[p]
        for n in range(k):
            r = c * k + n
            rows.append(
                {
                    "pair": p,
                    "source": src.names[i],
                    "target": src.names[j],
                    "variant": variant,
                    "sample": n,
                    "neighbours_from": nb.scope,
                    "n_neighbours": len(nb.idx),
                    "n_common": nb.n_common,
                    "active_threshold": thresholds[p],
                    "n_shared_dims": len(shared[p]),
                    "dim": feats.shape[1],
                    "cond_cos_dist_source": float(cosine_distance(conds[c], feats[i])),
                    "sample_cos_dist_source": float(cosine_distance(emb[r], feats[i])),
                    "sample_cos_dist_target": float(cosine_distance(emb[r], feats[j])),
                    "neighbour_indices": " ".join(str(int(v)) for v in nb.idx),
                    "neighbour_min_cos": float(nb.sims[-1]),
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
