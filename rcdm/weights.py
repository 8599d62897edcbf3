"""Registry of every external weight file, finding them in the weights directory, and ``rcdm fetch``.

Offline machines get the files by hand: a missing file is an error naming the file, the directory and the
URL its authors publish it at. Checksums: a full sha256 is used where one is published; torch.hub-style file
names (``name-<hex>.pth``) publish a sha256 prefix; for the others none is published, so the first
download records the sha256 in ``SHA256SUMS`` (``sha256sum -c`` format) in the weights directory and
every later check compares against it (trust on first use).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rcdm.io import sha256_file

SUMS_FILE = "SHA256SUMS"
_FB = "https://dl.fbaipublicfiles.com"


@dataclass(frozen=True)
class WeightFile:
    """One external file: where it comes from, what it is, how to check it."""

    name: str
    filename: str
    url: str
    kind: str  # "encoder", "rcdm" or "inception"
    dims: str
    description: str
    sha256: str | None = None  # full digest, where published
    sha256_prefix: str | None = None  # leading hex digits, where published (torch.hub file names)


def _rcdm(ssl: str, layer: str | None, dim: int) -> WeightFile:
    stem = f"rcdm_ema_{ssl}" + (f"_{layer}" if layer else "")
    what = f"{ssl} {layer}" if layer else ssl
    return WeightFile(
        name=stem,
        filename=f"{stem}.pt",
        url=f"{_FB}/rcdm/{stem}.pt",
        kind="rcdm",
        dims=f"128px UNet, conditioning {dim}",
        description=f"published RCDM (EMA weights) conditioned on the {what} representation",
    )


REGISTRY: dict[str, WeightFile] = {
    w.name: w
    for w in [
        WeightFile(
            "dino",
            "dino_resnet50_pretrain_full_checkpoint.pth",
            f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain_full_checkpoint.pth",
            "encoder",
            "trunk 2048, head 256",
            "DINO ResNet-50 full checkpoint (teacher: backbone + head)",
        ),
        WeightFile(
            "simclr",
            "simclr_rn50_1000ep_model_final_checkpoint_phase999.torch",
            f"{_FB}/vissl/model_zoo/simclr_rn50_1000ep_simclr_8node_resnet_16_07_20.afe428c7/"
            "model_final_checkpoint_phase999.torch",
            "encoder",
            "trunk 2048, head 128",
            "SimCLR ResNet-50, 1000 epochs, VISSL model zoo (saved under a distinct name)",
        ),
        WeightFile(
            "barlow",
            "barlow_twins_32gpus_4node_imagenet1k_1000ep_resnet50.torch",
            f"{_FB}/vissl/model_zoo/barlow_twins/barlow_twins_32gpus_4node_imagenet1k_1000ep_resnet50.torch",
            "encoder",
            "trunk 2048, head 8192",
            "Barlow Twins ResNet-50, 1000 epochs, VISSL model zoo",
        ),
        WeightFile(
            "vicreg",
            "vicreg_resnet50_fullckpt.pth",
            f"{_FB}/vicreg/resnet50_fullckpt.pth",
            "encoder",
            "trunk 2048, head 8192",
            "VICReg ResNet-50 full checkpoint (backbone + projector; saved under a distinct name)",
        ),
        WeightFile(
            "supervised",
            "resnet50-0676ba61.pth",
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "encoder",
            "trunk 2048",
            "torchvision ResNet-50 IMAGENET1K_V1 (what resnet50(pretrained=True) loads; with its fc, the "
            "adversarial study's classifier)",
            sha256_prefix="0676ba61",
        ),
        _rcdm("simclr", "trunk", 2048),
        _rcdm("simclr", "head", 128),
        _rcdm("barlow", "trunk", 2048),
        _rcdm("barlow", "head", 8192),
        _rcdm("vicreg", "trunk", 2048),
        _rcdm("vicreg", "head", 8192),
        _rcdm("dino", "trunk", 2048),
        _rcdm("dino", "head", 256),
        _rcdm("supervised", None, 2048),
        WeightFile(
            "inception",
            "pt_inception-2015-12-05-6726825d.pth",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
            "inception",
            "pool3 2048, logits 1008",
            "pytorch-fid's port of the TF FID Inception (FID_WEIGHTS_URL)",
            sha256_prefix="6726825d",
        ),
    ]
}

GROUPS: dict[str, list[str]] = {
    "encoders": [n for n, w in REGISTRY.items() if w.kind == "encoder"],
    "rcdm": [n for n, w in REGISTRY.items() if w.kind == "rcdm"],
    "all": list(REGISTRY),
}


class ChecksumError(RuntimeError):
    """A weight file's sha256 differs from the published or recorded one."""


def rcdm_checkpoint_name(encoder: str, layer: str = "trunk") -> str:
    """Registry name of the published RCDM checkpoint for an encoder and layer (supervised: no layer)."""
    name = "rcdm_ema_supervised" if encoder == "supervised" else f"rcdm_ema_{encoder}_{layer}"
    if name not in REGISTRY:
        raise KeyError(f"no published RCDM checkpoint for encoder {encoder!r}, layer {layer!r}")
    return name


def entry(name: str) -> WeightFile:
    """The registry entry for a name or a file name."""
    if name in REGISTRY:
        return REGISTRY[name]
    for w in REGISTRY.values():
        if w.filename == name:
            return w
    raise KeyError(
        f"unknown weight file {name!r}; known: {', '.join(REGISTRY)} (groups: {', '.join(GROUPS)})"
    )


def resolve(name: str, weights_dir: str | os.PathLike) -> Path:
    """Path of a registered file in ``weights_dir``; a clear FileNotFoundError (with the URL) if absent."""
    w = entry(name)
    path = Path(weights_dir) / w.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"weight file {w.filename!r} ({w.description}) not found in {Path(weights_dir).resolve()}. "
            f"Download it from {w.url} and save it there under that name, or run "
            f"`rcdm fetch --weights-dir {weights_dir} {w.name}` on a machine with internet access."
        )
    return path


# ------------------------------------------------------------------------------------------ checksums


def read_sums(weights_dir: str | os.PathLike) -> dict[str, str]:
    """``{filename: sha256}`` recorded in ``weights_dir/SHA256SUMS`` (empty if there is none)."""
    path = Path(weights_dir) / SUMS_FILE
    sums: dict[str, str] = {}
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            digest, _, fname = line.partition("  ")
            if len(digest) != 64 or not fname:
                raise ValueError(f"{path}:{n}: not a 'sha256  filename' line: {line!r}")
            sums[fname.lstrip("*")] = digest.lower()
    return sums


def record_sum(weights_dir: str | os.PathLike, filename: str, digest: str) -> None:
    """Add or replace one line of ``SHA256SUMS`` (rewritten atomically, sorted)."""
    from rcdm.io import atomic_path

    sums = read_sums(weights_dir) | {filename: digest}
    with atomic_path(Path(weights_dir) / SUMS_FILE) as tmp:
        tmp.write_text("".join(f"{d}  {f}\n" for f, d in sorted(sums.items())))


def check_digest(w: WeightFile, digest: str, recorded: str | None) -> str | None:
    """Compare a file's sha256 with what is known; return the reference it matched (None: nothing known).

    Raises ChecksumError on a mismatch.
    """
    for label, ref, ok in (
        ("published sha256", w.sha256, lambda r: digest == r),
        ("sha256 recorded in SHA256SUMS", recorded, lambda r: digest == r),
        ("sha256 prefix in the published file name", w.sha256_prefix, lambda r: digest.startswith(r)),
    ):
        if ref and not ok(ref):
            raise ChecksumError(
                f"{w.filename}: sha256 {digest} does not match the {label} ({ref}); the file is corrupt or "
                f"not the published one: delete it and download it again from {w.url}"
            )
    refs = [r for r in (w.sha256, recorded, w.sha256_prefix) if r]
    return refs[0] if refs else None


def verify(name: str, weights_dir: str | os.PathLike) -> str:
    """Check a present file's sha256; record it in SHA256SUMS if nothing was known. Returns a status word."""
    w = entry(name)
    path = resolve(name, weights_dir)
    recorded = read_sums(weights_dir).get(w.filename)
    digest = sha256_file(path)
    matched = check_digest(w, digest, recorded)
    if recorded is None:
        record_sum(weights_dir, w.filename, digest)
    return "verified" if matched else "recorded"


# ------------------------------------------------------------------------------------------ download


def download(url: str, dest: str | os.PathLike, *, timeout: float = 60.0, chunk: int = 1 << 20) -> Path:
    """Stream ``url`` to ``dest`` with a progress bar; resumes a ``.part`` file left by an interrupted run.

    The partial file is renamed onto ``dest`` only when complete, so ``dest`` never holds a partial download.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "rcdm-fetch"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the part file is already complete
            part.replace(dest)
            return dest
        raise ConnectionError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(
            f"cannot download {url} ({reason}). Offline? Download it on a machine with internet access and "
            f"place it at {dest}."
        ) from err
    with response:
        resumed = offset > 0 and getattr(response, "status", None) == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr
            ) as bar,
        ):
            while block := response.read(chunk):
                f.write(block)
                bar.update(len(block))
    if total is not None and part.stat().st_size != total:
        raise ConnectionError(
            f"download of {url} stopped at {part.stat().st_size} of {total} bytes; rerun to resume"
        )
    part.replace(dest)
    return dest


def fetch(name: str, weights_dir: str | os.PathLike, *, timeout: float = 60.0) -> tuple[Path, str]:
    """Make sure a registered file is present and checks out; download it if missing.

    Returns (path, status) with status "present", "downloaded" or "recorded" (first download of a file with
    no published checksum: its sha256 is now in SHA256SUMS). A download failing its checksum is deleted.
    """
    w = entry(name)
    path = Path(weights_dir) / w.filename
    if path.is_file():
        status = verify(name, weights_dir)
        return path, "present" if status == "verified" else "recorded"
    download(w.url, path, timeout=timeout)
    try:
        status = verify(name, weights_dir)
    except ChecksumError:
        path.unlink()
        raise
    return path, "downloaded" if status == "verified" else "recorded"


def expand(names: list[str]) -> list[str]:
    """Registry names from names, file names and groups, in order, without repeats."""
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            m = entry(m).name
            if m not in out:
                out.append(m)
    return out


def markdown_table() -> str:
    """The weights table of docs/weights.md, generated from the registry."""
    rows = ["| name | expected file name | dims | published at | sha256 check |", "|---|---|---|---|---|"]
    for w in REGISTRY.values():
        check = (
            f"`{w.sha256}`"
            if w.sha256
            else f"prefix `{w.sha256_prefix}`"
            if w.sha256_prefix
            else f"recorded in {SUMS_FILE} on first download"
        )
        rows.append(f"| {w.name} | `{w.filename}` | {w.dims} | <{w.url}> | {check} |")
    return "\n".join(rows) + "\n"
