"""Weight registry, resolve() errors, checksum logic and downloads: local files and a loopback server only."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from rcdm import weights
from rcdm.cli import main as cli_main
from rcdm.weights import ChecksumError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "weights.md"


def test_registry_names_and_published_urls():
    from pytorch_fid.inception import FID_WEIGHTS_URL
    from torchvision.models import ResNet50_Weights

    reg = weights.REGISTRY
    assert set(weights.GROUPS["encoders"]) == {"dino", "simclr", "barlow", "vicreg", "supervised"}
    rcdm = {
        f"rcdm_ema_{s}_{layer}" for s in ("simclr", "barlow", "vicreg", "dino") for layer in ("trunk", "head")
    }
    assert set(weights.GROUPS["rcdm"]) == rcdm | {"rcdm_ema_supervised"}
    assert (
        reg["inception"].url == FID_WEIGHTS_URL
        and reg["inception"].filename == FID_WEIGHTS_URL.split("/")[-1]
    )
    assert reg["supervised"].url == ResNet50_Weights.IMAGENET1K_V1.url
    for w in reg.values():
        if w.kind == "rcdm":
            assert w.url == f"https://dl.fbaipublicfiles.com/rcdm/{w.filename}"
        assert w.sha256_prefix is None or w.filename.endswith(f"-{w.sha256_prefix}.pth")
    assert len({w.filename for w in reg.values()}) == len(reg)
    assert weights.rcdm_checkpoint_name("dino", "head") == "rcdm_ema_dino_head"
    assert weights.rcdm_checkpoint_name("supervised") == "rcdm_ema_supervised"
    with pytest.raises(KeyError):
        weights.rcdm_checkpoint_name("supervised_x", "head")


def test_docs_table_matches_registry():
    assert weights.markdown_table() in DOCS.read_text()


def test_resolve_missing_file_names_file_dir_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        weights.resolve("vicreg", tmp_path)
    msg = str(err.value)
    assert "vicreg_resnet50_fullckpt.pth" in msg and str(tmp_path) in msg
    assert "https://dl.fbaipublicfiles.com/vicreg/resnet50_fullckpt.pth" in msg and "rcdm fetch" in msg
    (tmp_path / "vicreg_resnet50_fullckpt.pth").write_bytes(b"x")
    assert weights.resolve("vicreg", tmp_path) == tmp_path / "vicreg_resnet50_fullckpt.pth"
    assert (
        weights.resolve("vicreg_resnet50_fullckpt.pth", tmp_path) == tmp_path / "vicreg_resnet50_fullckpt.pth"
    )
    with pytest.raises(KeyError, match="unknown weight file 'mocov3'"):
        weights.resolve("mocov3", tmp_path)


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A registered file served from a local file:// URL."""
    data = bytes(range(256)) * 4099
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    entry = weights.WeightFile("blob", "blob.bin", src.as_uri(), "encoder", "trunk 4", "test blob")
    monkeypatch.setitem(weights.REGISTRY, "blob", entry)
    return data, hashlib.sha256(data).hexdigest()


def test_first_download_records_then_verifies(tmp_path, source):
    data, digest = source
    wdir = tmp_path / "w"
    path, status = weights.fetch("blob", wdir)
    assert status == "recorded" and path.read_bytes() == data
    assert (wdir / "SHA256SUMS").read_text() == f"{digest}  blob.bin\n"
    assert weights.fetch("blob", wdir)[1] == "present"
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(ChecksumError, match=f"recorded in SHA256SUMS \\({digest}\\)"):
        weights.fetch("blob", wdir)


def test_published_checksums_are_enforced(tmp_path, source, monkeypatch):
    data, digest = source
    good = dataclasses.replace(weights.REGISTRY["blob"], sha256_prefix=digest[:8])
    monkeypatch.setitem(weights.REGISTRY, "blob", good)
    assert weights.fetch("blob", tmp_path / "a")[1] == "downloaded"
    bad = dataclasses.replace(good, sha256="0" * 64)
    monkeypatch.setitem(weights.REGISTRY, "blob", bad)
    with pytest.raises(ChecksumError, match="published sha256"):
        weights.fetch("blob", tmp_path / "b")
    assert not (tmp_path / "b" / "blob.bin").exists()  # a download failing its checksum is removed
    wrong_prefix = dataclasses.replace(
        good, sha256_prefix="ffffffff" if digest[:8] != "ffffffff" else "00000000"
    )
    monkeypatch.setitem(weights.REGISTRY, "blob", wrong_prefix)
    with pytest.raises(ChecksumError, match="prefix"):
        weights.fetch("blob", tmp_path / "c")


def test_checksum_logic_closed_cases():
    w = weights.WeightFile("x", "x-abcd.pth", "u", "encoder", "", "", sha256_prefix="abcd")
    assert weights.check_digest(w, "abcd" + "0" * 60, None) == "abcd"
    assert weights.check_digest(w, "abcd" + "0" * 60, "abcd" + "0" * 60) == "abcd" + "0" * 60
    with pytest.raises(ChecksumError):
        weights.check_digest(w, "abce" + "0" * 60, None)
    plain = dataclasses.replace(w, sha256_prefix=None)
    assert weights.check_digest(plain, "1" * 64, None) is None


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        body, code = self.payload, 200
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            body, code = self.payload[start:], 206
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file(tmp_path):
    data = bytes(range(251)) * 1000
    _RangeHandler.payload, _RangeHandler.ranges = data, []
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dest = tmp_path / "f.bin"
        (tmp_path / ".f.bin.part").write_bytes(data[:1000])
        weights.download(f"http://127.0.0.1:{server.server_port}/f.bin", dest, chunk=4096)
    finally:
        server.shutdown()
    assert _RangeHandler.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == data and not (tmp_path / ".f.bin.part").exists()


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    entry = weights.WeightFile("far", "far.bin", "http://127.0.0.1:9/far.bin", "encoder", "", "unreachable")
    monkeypatch.setitem(weights.REGISTRY, "far", entry)
    with pytest.raises(ConnectionError, match=r"Offline\?.*far\.bin"):
        weights.fetch("far", tmp_path, timeout=5)
    assert not (tmp_path / "far.bin").exists()
    assert cli_main(["fetch", "--weights-dir", str(tmp_path), "--timeout", "5", "far"]) == 1


def test_cli_lists_and_fetches(tmp_path, source, capsys):
    assert cli_main(["fetch", "--list"]) == 0
    assert "rcdm_ema_dino_head.pt" in capsys.readouterr().out
    assert cli_main(["fetch", "--weights-dir", str(tmp_path), "blob", "blob.bin"]) == 0
    out = capsys.readouterr().out
    assert out.count("blob: recorded") == 1 and (tmp_path / "blob.bin").is_file()
    assert weights.expand(["encoders", "dino"]) == weights.GROUPS["encoders"]
