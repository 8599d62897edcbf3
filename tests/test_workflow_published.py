"""RCDMs from weight files (encoders.<name>.rcdm): config/published.yaml plans no training, and the micro
configuration runs end to end on a synthetic checkpoint in the published layout under the published name."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_workflow import ROOT, job_counts, snakemake, write_config


# ------------------------------------------------------------------------------- published RCDM checkpoints
def test_published_config_plans_no_training(tmp_path):
    """config/published.yaml: the nine published RCDMs sampled, evaluated, studied and tabulated as trained
    ones are, with no training job (nor the train set's images or features) in the DAG."""
    # the cluster's ImageNet folders stood in for by folders of empty files (DAG-time checks count names only)
    folders = {"train": 64, "val": 128}  # one image per extraction shard (nothing trains); tradeoff.num_cond
    for split, n in folders.items():
        (tmp_path / split).mkdir()
        for i in range(n):
            (tmp_path / split / f"{i:05d}.JPEG").touch()
    paths = {f"data.{split}.path": str(tmp_path / split) for split in folders}
    published = str(write_config(tmp_path, "published.yaml", name="published.yaml", **paths))
    proc = snakemake("-n", "-p", "--configfile", published, "--cores", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert "train" not in counts and "train_check" not in counts and "run_flags" not in counts
    assert counts["file_flags"] == counts["evaluate"] == counts["tradeoff"] == 9
    assert counts["tabulate"] == 1 and counts["study"] > 0
    # the nine RCDM files (as the registry names them), the five encoders and the Inception weights, fetched
    from rcdm.weights import entry, rcdm_checkpoint_name

    cfg = yaml.safe_load(Path(published).read_text())
    runs = [(e, layer) for e, spec in cfg["encoders"].items() for layer in spec["layers"]]
    assert len(runs) == 9 and counts["fetch"] == 9 + 5 + 1
    for encoder, layer in runs:
        assert f"rcdm flags weights/{entry(rcdm_checkpoint_name(encoder, layer)).filename} " in proc.stdout
    assert "--split train" not in proc.stdout  # the train set is never read
    # the adversarial study's supervised comparison: torchvision's ResNet-50 (with fc), a fetched weight file
    classifier = entry("supervised").filename
    assert f"rcdm fetch --weights-dir weights {classifier} " in proc.stdout
    jobs = [line for line in proc.stdout.splitlines() if "_check/" not in line]  # not the local check jobs
    adversarial = [line for line in jobs if "rcdm study adversarial " in line]
    assert len(adversarial) == 9 and all(f"--classifier weights/{classifier} " in c for c in adversarial)
    others = [line for line in jobs if "rcdm study " in line and line not in adversarial]
    assert others and not any("--classifier" in c for c in others)


def test_demo_adversarial_study_asks_the_probe(tmp_path):
    """The demo's supervised comparison: the shapes factor probe (trained by study_probe) is the classifier;
    without the probe, asking for it fails the dry run naming the key."""
    proc = snakemake("-n", "-p", "--configfile", str(ROOT / "config" / "config.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [line for line in proc.stdout.splitlines() if "_check/" not in line]  # not the local check jobs
    adversarial = [line for line in jobs if "rcdm study adversarial " in line]
    assert len(adversarial) == 2  # trunk and head
    assert all("--classifier results/demo/studies/probe/probe.pt " in c for c in adversarial)
    changes = {
        "studies.run": ["adversarial"],
        "studies.probe": False,
        "studies.adversarial_classifier": "probe",
    }
    cfg = write_config(tmp_path, "micro.yaml", **changes)
    proc = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert proc.returncode != 0
    assert "studies.adversarial_classifier: probe needs the shapes factor probe" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def published_run(tmp_path_factory):
    """The micro config with the demo encoder's RCDM taken from a synthetic checkpoint in the published layout
    (a bare UNet state dict) under the published file name (an encoder named `dino`, so the registry names its
    file), one study; dry-run counts and the run's results directory."""
    import torch

    from rcdm import create_model_and_diffusion
    from rcdm.factory import MODEL_FLAGS_128
    from rcdm.weights import entry, rcdm_checkpoint_name

    work = tmp_path_factory.mktemp("published")
    micro = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    changes = {
        "experiment": "micro_published",
        "weights_dir": str(work / "weights"),
        "encoders": {"dino": {"source": "pretrain", "layers": ["trunk"], "rcdm": "published"}},
        "studies.run": ["conditioned"],
        "studies.probe": False,
    }
    cfg_path = write_config(work, "micro.yaml", name="published.yaml", **changes)
    # the published flags (the schema's `model` defaults) with the micro config's; ssl_dim: the trunk's size
    flags = {**MODEL_FLAGS_128, **micro["model"], "image_size": micro["data"]["image_size"]}
    model, _ = create_model_and_diffusion(**{**flags, "ssl_dim": micro["pretrain"]["widths"][-1]})
    (work / "weights").mkdir()
    torch.save(model.state_dict(), work / "weights" / entry(rcdm_checkpoint_name("dino", "trunk")).filename)
    dry = snakemake("-n", "--cores", "2", "--configfile", str(cfg_path), cwd=work)
    assert dry.returncode == 0, dry.stderr[-3000:]
    proc = snakemake("--cores", "2", "--configfile", str(cfg_path), cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return job_counts(dry.stdout), work / "results" / "micro_published", micro


def test_rcdm_published_needs_a_registered_name(tmp_path):
    cfg = write_config(tmp_path, "micro.yaml", **{"encoders.demo.rcdm": {"trunk": "published"}})
    proc = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert proc.returncode != 0 and "Error validating config file" in proc.stderr + proc.stdout
    assert "rcdm published: the encoder's name must be" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_published_checkpoint_end_to_end(published_run):
    counts, res, micro = published_run
    assert "train" not in counts and "train_check" not in counts and "run_flags" not in counts
    assert counts["file_flags"] == 1 and counts["evaluate"] == 1 and counts["tabulate"] == 1
    assert not (res / "models" / "dino" / "trunk" / "train_summary.json").exists()
    # the flags read off the file: its representation size, and the config's flags it cannot show
    flags = json.loads((res / "models" / "dino" / "trunk" / "file_flags.json").read_text())
    assert flags["ssl_dim"] == micro["pretrain"]["widths"][-1]
    assert flags["num_heads"] == micro["model"]["num_heads"]
    with np.load(res / "samples" / "dino" / "trunk" / "val" / "samples.npz") as z:
        n = micro["sample"]["num_conditionings"] * micro["sample"]["samples_per_image"]
        assert z["arr_0"].shape == (n, micro["data"]["image_size"], micro["data"]["image_size"], 3)
    with open(res / "metrics" / "dino" / "trunk" / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert math.isfinite(float(row["fd_rep"])) and 0 < float(row["mrr"]) <= 1
    with open(res / "tables" / "metrics_all.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert (res / "studies" / "dino" / "trunk" / "val" / "conditioned" / "conditioned.png").stat().st_size > 0
