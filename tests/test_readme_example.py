"""The README's Python API example runs as written, on synthetic weight files in the published layouts.

The example's code block is read from README.md and run in a folder holding files under the names it uses:
a small RCDM UNet state dict (the published file layout: a bare state dict, 128 px, widths read off the file),
a DINO checkpoint in the published layout (random ResNet-50) and two JPEGs. Only the device ("cuda" -> "cpu")
and the step count (20 -> 2, to keep the test short; any step count takes the same path) are substituted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_encoders import heads, make_checkpoint, trunk_sd  # noqa: F401  (fixtures)

from rcdm.factory import MODEL_FLAGS_128, create_model_and_diffusion

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "rcdm.load_model" in b]
    return block


def test_readme_api_example_runs(tmp_path, monkeypatch, trunk_sd, heads):  # noqa: F811
    code = _example()
    for old, new in (('device="cuda"', 'device="cpu"'), (".cuda()", ""), ("steps=20", "steps=2")):
        assert old in code, f"the README example no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    weights = tmp_path / "weights"
    weights.mkdir()
    flags = {**MODEL_FLAGS_128, "num_channels": 32, "num_res_blocks": 1}
    model, _ = create_model_and_diffusion(**flags)
    torch.save(model.state_dict(), weights / "rcdm_ema_dino_trunk.pt")
    dino = make_checkpoint("dino", trunk_sd, heads)
    torch.save(dino, weights / "dino_resnet50_pretrain_full_checkpoint.pth")
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (300, 260)), ("b.jpg", (240, 320))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    samples, feat = scope["samples"], scope["feat"]
    assert feat.shape == (2, 2048)
    assert samples.shape == (2, 3, 128, 128)
    assert torch.isfinite(samples).all() and samples.abs().max() <= 1
