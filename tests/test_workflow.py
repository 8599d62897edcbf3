"""The Snakemake workflow: config validation, the paper's DAG, and the micro configuration end to end.

The end-to-end run (config/micro.yaml, --cores 2) goes through every stage on tiny data; the checks read what
it produced (HDF5 layouts, samples.npz, grids, metrics) and compare values with what they must be.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"


def snakemake(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m snakemake` on the workflow, run in `cwd` (outputs, logs and .snakemake/ stay there)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(cwd), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def job_counts(output: str) -> dict[str, int]:
    """The `Job stats` table of a (dry) run: rule name -> number of jobs ({} when nothing is to be done)."""
    if "Job stats:" not in output:
        assert "Nothing to be done" in output, output[-3000:]
        return {}
    table = output[output.index("Job stats:") :]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def stage_names() -> list[str]:
    """The stages: the config's `resources` keys but `default`, each a rule name."""
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    return [key for key in schema["properties"]["resources"]["properties"] if key != "default"]


def rule_graph(cwd: Path, *args: str) -> dict[str, set[str]]:
    """`--rulegraph` as rule -> the rules it depends on, directly or not."""
    dot = snakemake("--rulegraph", *args, cwd=cwd).stdout
    names = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", dot, flags=re.M))
    deps: dict[str, set[str]] = {name: set() for name in names.values()}
    for a, b in re.findall(r"^\s*(\d+) -> (\d+)$", dot, flags=re.M):
        deps[names[b]].add(names[a])
    changed = True
    while changed:  # transitive closure
        changed = False
        for up in deps.values():
            more = set().union(*(deps[u] for u in up)) - up
            if more:
                up |= more
                changed = True
    return deps


def write_config(tmp_path: Path, base: str, name: str = "config.yaml", **changes) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / base).read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"train.stepz": 3}, "stepz"),  # misspelt key, nested
        ({"sample.steps": "many"}, "steps"),  # wrong type
        ({"colour": "red"}, "colour"),  # unknown top-level key
        ({"resources.train": {"gpus": 2}}, "gpus"),  # unknown resource name
        ({"data.val.source": "imagenet"}, "source"),  # not one of the allowed values
        # checks of names and of keys that depend on other keys (propertyNames, if/then in the schema)
        ({"data.ood.val": {"source": "photos"}}, "['data']['ood']"),  # a reserved name
        ({"data.ood.my-set": {"source": "photos"}}, "my-set"),  # not letters, digits, '_'
        ({"data.val": {"source": "folder"}}, "['data']['val']['path']"),  # a folder without its path
        ({"encoders.my-enc": {"source": "pretrain"}}, "my-enc"),
        ({"encoders.mine": {"source": "custom", "file": "m.pt"}}, "['encoders']['mine']['factory']"),
        ({"encoders.mine": {"source": "custom", "factory": "m.py", "file": "m.pt"}}, "['encoders']['mine']"),
        ({"encoders.mocov3": {"source": "published"}}, "['encoders']['mocov3']['source']"),  # not registered
        ({"data.shapes": {"kinds": ["circle", "blob"]}}, "blob"),  # not a shapes kind
        ({"data.shapes": {"size": [0.5]}}, "['data']['shapes']['size']"),
        ({"data.shapes": {"rotation": 720}}, "720"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(tmp_path, change, named):
    cfg = write_config(tmp_path, "micro.yaml", **change)
    proc = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "Error validating config file" in err
    assert named in err
    assert not (tmp_path / "results").exists()  # nothing ran


def test_schema_knows_the_published_encoders():
    """The schema's list of names that may be `source: published` is the weight registry's encoders."""
    from rcdm.weights import REGISTRY

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    (pattern,) = schema["properties"]["encoders"]["patternProperties"]
    listed = re.fullmatch(r"\^\(\?!\((.*)\)\$\)", pattern)[1].split("|")
    assert sorted(listed) == sorted(name for name, w in REGISTRY.items() if w.kind == "encoder")


def test_schema_fills_defaults(tmp_path):
    """A minimal config is complete after validation: the defaults of every section apply."""
    cfg = {
        "experiment": "tiny",
        "data": {
            "image_size": 16,
            "train": {"source": "shapes"},
            "val": {"source": "shapes"},
        },
        "encoders": {"enc": {"source": "pretrain"}},
        "model": {"channel_mult": "1,2", "attention_resolutions": ""},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "-p", "--configfile", str(path), "--cores", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    # a set's split defaults to its name: val is generated as the val split, not as the train images
    splits = re.findall(r"^Shell command: rcdm extract .*--split (\w+) .*--images-out", proc.stdout, re.M)
    assert sorted(splits) == ["train", "val"]
    # one encoder, default layer trunk, one shard each: train/val images, pretrain, features, one model
    assert counts["train"] == 1
    assert counts["pretrain"] == 1
    assert counts["extract_images"] == 2
    assert counts["sample"] == 1 and counts["merge_samples"] == 1
    assert counts["evaluate"] == 1


def test_shapes_style_reaches_extraction_and_only_where_it_differs(tmp_path):
    """data.shapes becomes `rcdm extract --shapes-*` for every shapes set (not the photos): only the settings
    that differ from the default style: a config that spells out a default keeps its commands (no rerun)."""
    style = {"kinds": ["circle", "cross"], "max_count": 1, "rotation": 360, "size": [0.3, 0.7]}
    cfg = write_config(tmp_path, "config.yaml", **{"data.shapes": style})
    proc = snakemake("-n", "-p", "--configfile", str(cfg), "--until", "merge_images", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cmds = re.findall(r"^Shell command: (rcdm extract .*--images-out.*)$", proc.stdout, re.M)
    shapes = [c for c in cmds if "--dataset shapes" in c]
    assert len(shapes) == 2 and len(cmds) == 3  # train, val; photos
    assert all("--shapes-kinds circle cross --shapes-max-count 1 " in c for c in shapes)
    assert not any("--shapes-rotation" in c or "--shapes-size" in c for c in cmds)
    assert not any("--shapes-" in c for c in cmds if "--dataset photos" in c)
    default = write_config(
        tmp_path, "micro.yaml", "d.yaml", **{"data.shapes": {"max_count": 3, "rotation": 360}}
    )
    proc = snakemake("-n", "-p", "--configfile", str(default), "--until", "merge_images", cwd=tmp_path)
    assert proc.returncode == 0 and "--shapes-" not in proc.stdout


def test_every_stage_is_a_rule_and_its_resources_key(tmp_path):
    """The config's `resources` keys are the rule names: each entry reaches its rule's jobs (and only
    those), as does `--set-resources <stage>:...`."""
    stages = stage_names()
    mem = {stage: 1000 + i for i, stage in enumerate(stages)}
    resources = {stage: {"mem_mb": mem[stage]} for stage in stages}
    change = {"tradeoff.run": True, "tradeoff.num_cond": 16, "resources": resources}  # 16 val images in micro
    cfg = write_config(tmp_path, "micro.yaml", **change)
    proc = snakemake("-n", "--configfile", str(cfg), "--set-resources", "sample:runtime=77", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned: dict[str, set[str]] = {}
    job = r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$"
    for rule, res in re.findall(job, proc.stdout, flags=re.M):
        planned.setdefault(rule, set()).add(res)
    assert set(stages) - {"fetch"} <= set(planned)  # the micro config fetches nothing
    for stage in set(stages) & set(planned):
        assert all(f"mem_mb={mem[stage]}," in res for res in planned[stage]), (stage, planned[stage])
    assert all("runtime=77" in res for res in planned["sample"])
    assert not any("runtime=77" in res for rule, rs in planned.items() if rule != "sample" for res in rs)


def test_slurm_task_geometry_from_the_config(tmp_path):
    """nodes and tasks_per_gpu are resources keys; the GPU ones reach only jobs with GPUs."""
    resources = {"train": {"gpu": 2, "tasks_per_gpu": 1, "nodes": 1}, "sample": {"tasks_per_gpu": 1}}
    cfg = write_config(tmp_path, "micro.yaml", resources=resources)
    proc = snakemake("-n", "--configfile", str(cfg), "--until", "sample", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", proc.stdout, flags=re.M)
    train = [res for rule, res in jobs if rule == "train"]
    assert train and all("gpu=2" in res and "tasks_per_gpu=1" in res and "nodes=1" in res for res in train)
    assert not any("tasks_per_gpu" in res for rule, res in jobs if rule == "sample")


def test_multi_node_training_launch(tmp_path):
    """resources.train.nodes > 1: one task per node (mpi: the job's shell runs srun itself), `gpu` GPUs per
    node as --gres (no --ntasks-per-gpu), one torchrun per node with a c10d rendezvous
    (rcdm.distributed.torchrun_launcher, as tests/test_slurm_multinode.py runs it); one node: torchrun
    --standalone with one process per GPU, as before."""
    from rcdm.distributed import torchrun_launcher

    def train_job(resources: dict) -> tuple[str, str]:
        cfg = write_config(tmp_path, "micro.yaml", resources={"train": resources})
        proc = snakemake("-n", "-p", "--configfile", str(cfg), "--until", "train", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        job = r"^rule train:\n(?:    .*\n)*?    resources: (.*)\n(?:.*\n)*?Shell command: (.*)$"
        res, shell = re.search(job, proc.stdout, flags=re.M).groups()
        return res, shell

    res, shell = train_job({"nodes": 4, "gpu": 8, "gpu_model": "a100", "threads": 64})
    for item in ("nodes=4", "mpi=srun", "tasks=4", "tasks_per_gpu=0", "gres=gpu:a100:8", "gpu=0"):
        assert f"{item}," in res, (item, res)
    assert "gpu_model" not in res
    assert shell.startswith(torchrun_launcher(4, 8, 64, 8) + " rcdm train "), shell
    _, shell = train_job({"gpu": 2})
    assert shell.startswith("torchrun --standalone --nproc-per-node=2 -m rcdm train "), shell
    _, shell = train_job({"gpu": 1})
    assert shell.startswith("rcdm train ") or shell.startswith(" rcdm train "), shell


def test_imagenet_config_builds_the_full_dag(tmp_path):
    """The paper's setting: 4 SSL encoders x trunk/head + supervised, sharded; weights come by fetch jobs."""
    # the cluster's ImageNet folders stood in for by folders of empty files (DAG-time checks count names only)
    folders = {"train": 256, "val": 128}  # one batch; tradeoff.num_cond (>= one image per sampling shard)
    for split, n in folders.items():
        (tmp_path / split).mkdir()
        for i in range(n):
            (tmp_path / split / f"{i:05d}.JPEG").touch()
    paths = {f"data.{split}.path": str(tmp_path / split) for split in folders}
    imagenet = str(write_config(tmp_path, "imagenet.yaml", name="imagenet.yaml", **paths))
    proc = snakemake("-n", "-p", "--configfile", imagenet, "--cores", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    cfg = yaml.safe_load((ROOT / "config" / "imagenet.yaml").read_text())
    # the paper's protocol: FID/IS on 10,000 samples against 10,000 val images, rank/MRR on all 50,000
    jobs = [line for line in proc.stdout.splitlines() if "_check/" not in line]  # not the check jobs' logs
    evaluate_cmds = [line for line in jobs if "rcdm evaluate " in line]
    assert len(evaluate_cmds) == 9
    assert all("--n-fid 10000" in c and "--n-reference 10000" in c for c in evaluate_cmds)
    # the studies, for every encoder and layer; trunk-head for each encoder with both layers
    both = sum(set(e["layers"]) == {"trunk", "head"} for e in cfg["encoders"].values())
    assert both == 4 and sum("rcdm study trunk-head " in line for line in jobs) == both
    per_model = len(cfg["studies"]["run"]) - 2 + len(cfg["data"]["ood"])  # ood once per OOD set
    assert counts["study"] == 9 * per_model + both
    assert counts["tradeoff"] == 9  # the sampler speed/quality curve of every model
    assert cfg["sample"]["num_conditionings"] is None and cfg["sample"]["samples_per_image"] == 1  # all val
    runs = sum(len(e["layers"]) for e in cfg["encoders"].values())
    assert runs == 9
    assert counts["train"] == runs
    assert counts["evaluate"] == runs
    sets = {"train": cfg["data"]["train"], "val": cfg["data"]["val"], **cfg["data"]["ood"]}
    shards = {name: spec.get("shards") or cfg["extract"]["shards"] for name, spec in sets.items()}
    # one extraction job per shard (one for an unsharded set), one merge per file (one part: a link)
    assert counts["extract_images"] == sum(shards.values())
    assert counts["merge_images"] == len(sets)
    assert counts["extract_features"] == len(cfg["encoders"]) * sum(shards.values())
    assert counts["merge_features"] == runs * len(sets)
    assert counts["sample"] == runs * (cfg["sample"]["shards"] + len(cfg["data"]["ood"]))
    assert counts["merge_samples"] == runs * (1 + len(cfg["data"]["ood"]))
    assert counts["fetch"] == len(cfg["encoders"]) + 1  # encoder files + the Inception weights
    # every model's adversarial study asks (and attacks) the supervised ResNet-50 classifier, fetched above
    adversarial = [line for line in jobs if "rcdm study adversarial " in line]
    assert len(adversarial) == 9
    assert all("--classifier weights/resnet50-0676ba61.pth " in c for c in adversarial)
    assert counts["tabulate"] == 1
    # one local check before each group of GPU jobs that share their inputs, never one per shard: per
    # (encoder, set) of the features, (model, conditioning set) of the samples, and per job of the others
    assert counts["extract_features_check"] == len(cfg["encoders"]) * len(sets)
    assert counts["sample_check"] == runs * (1 + len(cfg["data"]["ood"]))
    assert counts["evaluate_check"] == counts["tradeoff_check"] == counts["train_check"] == runs
    assert counts["study_check"] == counts["study"]
    # sbatch submissions through the SLURM profile: every job but the local ones, each on its own (the profile
    # submits no job arrays: slurm/config.yaml says why); with arrays of the shard rules, the shards of one
    # (rule, other wildcards) become ready together and would go as one array at most
    checks = {"train_check", "extract_features_check", "sample_check", "evaluate_check", "tradeoff_check"}
    local = {"all", "fetch", "model_flags", "run_flags", "hero", "study_check", *checks}
    cluster = sum(n for rule, n in counts.items() if rule not in local | {"total"})
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    assert "slurm-array-jobs" not in profile
    arrays = {"extract_images", "extract_features", "sample"}
    groups = set()
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", proc.stdout, flags=re.M):
        wildcards = re.search(r"^    wildcards: (.*)$", body, flags=re.M)
        if rule in arrays:
            groups.add((rule, re.sub(r"shard=\d+, ?", "", wildcards[1])))
    shards = sum(counts[rule] for rule in arrays)
    assert (cluster, shards, len(groups)) == (1031, 897, 36)
    assert cluster - shards + len(groups) == 170  # sbatch submissions at most with arrays, against 1031


# ------------------------------------------------------------------------------------------ fail fast
def image_folder(path: Path, n: int) -> str:
    """A folder of `n` tiny PNG images."""
    path.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(path / f"{i:03d}.png")
    return str(path)


# (change to config/micro.yaml, the config key named, what the message tells to do): each fails the dry run
FAIL_AT_START = {
    "missing folder": ({"data.val": {"source": "folder", "path": "no/such"}}, "data.val.path", "point it"),
    "empty folder": ({"data.val": {"source": "folder", "path": "empty"}}, "data.val.path", "holds no images"),
    "folder too small": (
        {"data.val": {"source": "folder", "path": "three", "num_images": 5}},
        "data.val.num_images: 5",
        "holds 3 images",
    ),
    "too few photos": ({"data.ood.photos.num_images": 500}, "data.ood.photos.num_images: 500", "for all"),
    "conditionings": ({"sample.num_conditionings": 100}, "sample.num_conditionings: 100", "data.val has 16"),
    "ood images": ({"ood.num_images": 10}, "ood.num_images: 10", "data.ood.photos has 4"),
    "sample shards": ({"sample.shards": 20}, "sample.shards: 20", "at most 8"),
    "extract shards": ({"data.val.shards": 17}, "data.val.shards", "at most 16"),
    "batch": ({"train.batch_size": 200}, "train.batch_size: 200", "fewer than one batch"),
    "tradeoff": ({"tradeoff.run": True, "tradeoff.num_cond": 17}, "tradeoff.num_cond: 17", "at most 16"),
}


@pytest.mark.parametrize("case", FAIL_AT_START)
def test_config_asking_more_than_exists_fails_at_the_start(tmp_path, case):
    """Checks against the data run while the DAG is built (`snakemake -n`), before any job: one line naming
    the config key, what is wrong and what to do; never a silent cut."""
    change, key, fix = FAIL_AT_START[case]
    (tmp_path / "empty").mkdir()
    image_folder(tmp_path / "three", 3)
    proc = snakemake("-n", "--configfile", str(write_config(tmp_path, "micro.yaml", **change)), cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    line = next((line for line in err.splitlines() if line.startswith(key)), err[-2000:])
    assert fix in line, line
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()  # nothing ran


def test_image_folders_are_counted_at_the_start(tmp_path):
    """A folder dataset passes the checks with as many images as the config asks for, at any depth."""
    folder = image_folder(tmp_path / "val" / "a", 8)
    image_folder(tmp_path / "val" / "b", 8)
    change = {"data.val": {"source": "folder", "path": str(tmp_path / "val")}, "sample.num_conditionings": 16}
    proc = snakemake("-n", "--configfile", str(write_config(tmp_path, "micro.yaml", **change)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert folder in proc.stdout or "extract_images" in proc.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--groups", "sample=s", "extract_images=e"],  # no shard_slots limit
        ["--groups", "sample=s", "--resources", "shard_slots=1"],  # global scope: one shard in the cluster
    ],
)
def test_grouped_shards_without_their_one_slot_limit_are_refused(tmp_path, flags):
    """Grouped shard jobs without `shard_slots=1` (local scope) would each ask for the GPUs of all their
    shards and use one: the run stops before any job (slurm/config.yaml sets both; a command line's
    --resources replaces the profile's list)."""
    cfg = str(write_config(tmp_path, "micro.yaml"))
    proc = snakemake("--cores", "1", "--configfile", cfg, "--until", "extract_images", *flags, cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    line = next(line for line in err.splitlines() if line.startswith("--groups puts the shard jobs of"))
    assert "Add shard_slots=1 to --resources and shard_slots=local to --set-resource-scopes" in line, line
    assert not (tmp_path / "logs").exists() and not (tmp_path / "results").exists()  # nothing ran


@pytest.mark.slow
def test_permanent_train_error_fails_once_in_the_check(tmp_path):
    """A batch larger than the train set (here through extra_args, which the DAG-time checks do not read)
    fails in the local `train_check` job, once, as one line; the training job (retried, on GPUs) never
    starts."""
    change = {"train.extra_args": "--batch-size 200", "train.retries": 3, "data.train.shards": 1}
    cfg = write_config(tmp_path, "micro.yaml", **change)
    proc = snakemake("--cores", "2", "--configfile", str(cfg), "--until", "train", cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "Error in rule train_check" in err
    line = next(line for line in err.splitlines() if line.startswith("rcdm train: error:"))
    assert "fewer than one global batch of 200" in line and "images.h5" in line and "(log: " in line
    assert "rule train:" not in err and not (tmp_path / "logs" / "micro" / "train").exists()
    assert err.count("Error in rule train_check") == 1  # no retry


@pytest.mark.slow
def test_corrupt_intermediate_file_fails_once_in_the_check(tmp_path):
    """A corrupted intermediate file (the val features, cut short after they were made) fails the local
    `sample_check` job, once, as one line naming the file; no sampling shard (retried, on GPUs) starts."""
    cfg = str(write_config(tmp_path, "micro.yaml", **{"resources.sample": {"retries": 3}}))
    features = Path("results/micro/features/demo/val/trunk.h5")
    proc = snakemake(str(features), "--cores", "2", "--configfile", cfg, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = (tmp_path / features).read_bytes()
    (tmp_path / features).write_bytes(data[: len(data) // 2])
    samples = "results/micro/samples/demo/trunk/val/samples.npz"
    proc = snakemake(samples, "--cores", "2", "--configfile", cfg, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert err.count("Error in rule sample_check") == 1  # no retry
    line = next(line for line in err.splitlines() if line.startswith("rcdm sample: error:"))
    assert f"{features}: not a readable HDF5 file" in line and "delete it and rerun" in line
    assert "(log: logs/micro/sample_check/demo/trunk/val.log)" in line
    assert "rule sample:" not in err and not (tmp_path / "logs" / "micro" / "sample").exists()


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """config/micro.yaml run once with --cores 2 in a scratch directory."""
    work = tmp_path_factory.mktemp("micro")
    micro = str(ROOT / "config" / "micro.yaml")
    proc = snakemake("--cores", "2", "--configfile", micro, cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    cfg = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    return work, work / "results" / cfg["experiment"], cfg


@pytest.mark.slow
def test_micro_images_and_features(micro_run):
    _, res, cfg = micro_run
    size = cfg["data"]["image_size"]
    for name in ("train", "val"):
        with h5py.File(res / "data" / name / "images.h5", "r") as h5:
            n = cfg["data"][name]["num_images"]
            assert h5["images"].shape == (n, size, size, 3)
            assert h5["images"].dtype == np.uint8
            assert h5["images"][:].std() > 0  # real pictures, not a blank
        for layer in cfg["encoders"]["demo"]["layers"]:
            with h5py.File(res / "features" / "demo" / name / f"{layer}.h5", "r") as h5:
                feats = h5["features"][:]
                assert feats.shape[:2] == (n, 2)
                assert np.isfinite(feats).all()
                # the mirror's representation differs from the image's (shapes are not symmetric)
                assert not np.allclose(feats[:, 0], feats[:, 1])
    # extraction shards are temporary (removed after the merge); sampling shards are kept (costly to redo)
    assert not list((res / "data").rglob("*.part-*")) and not list((res / "features").rglob("parts-*"))
    assert len(list((res / "samples").rglob("val/samples.part-*-of-*.h5"))) == cfg["sample"]["shards"]


@pytest.mark.slow
def test_micro_samples_and_grids(micro_run):
    _, res, cfg = micro_run
    size = cfg["data"]["image_size"]
    for layer in cfg["encoders"]["demo"]["layers"]:
        run = res / "samples" / "demo" / layer
        with np.load(run / "val" / "samples.npz") as z:
            arr = z["arr_0"]
        n = cfg["sample"]["num_conditionings"] * cfg["sample"]["samples_per_image"]
        assert arr.shape == (n, size, size, 3)
        assert arr.dtype == np.uint8
        for dataset in ["val", *cfg["data"]["ood"]]:
            with Image.open(run / dataset / "grid.png") as im:
                assert im.format == "PNG"
                # at least the conditioning column plus one sample column of size x size tiles
                assert im.width >= 2 * size and im.height >= size


@pytest.mark.slow
def test_micro_metrics(micro_run):
    _, res, cfg = micro_run
    n_cond = cfg["sample"]["num_conditionings"]
    for layer in cfg["encoders"]["demo"]["layers"]:
        with open(res / "metrics" / "demo" / layer / "metrics.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert int(row["n_samples"]) == n_cond * cfg["sample"]["samples_per_image"]
        # chance MRR of a uniformly random rank among n conditionings: H_n / n
        assert float(row["chance_mrr"]) == pytest.approx(sum(1 / k for k in range(1, n_cond + 1)) / n_cond)
        assert 1 <= float(row["mean_rank"]) <= n_cond
        assert 1 / n_cond <= float(row["mrr"]) <= 1
        assert math.isfinite(float(row["fd_rep"])) and float(row["fd_rep"]) >= 0
        assert row["fid"] == ""  # no Inception weights in a scratch weights_dir: empty, never made up
        assert "Inception" in row["status"]
    with open(res / "tables" / "metrics_all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cfg["encoders"]["demo"]["layers"])  # one row per run
    assert "MRR" in (res / "tables" / "table1.md").read_text()


@pytest.mark.slow
def test_micro_logs_benchmarks_and_rerun(micro_run):
    work, res, cfg = micro_run
    exp = cfg["experiment"]
    assert (work / "logs" / exp / "train" / "demo" / "trunk.log").stat().st_size > 0
    bench = work / "benchmarks" / exp / "train" / "demo" / "trunk.tsv"
    assert bench.read_text().startswith("s\t")
    # training checkpoints are kept outside the declared outputs, for resuming
    assert list((res / "checkpoints" / "demo" / "trunk").rglob("ckpt_*.pt"))
    micro = str(ROOT / "config" / "micro.yaml")
    proc = snakemake("-n", "--cores", "2", "--configfile", micro, cwd=work)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr
    assert not (res / ".finished").exists()  # the shards' kept copies (rcdm.finished) went with the run
    # rerunning one stage reruns it and what depends on it, nothing upstream
    proc = snakemake("-n", "--cores", "2", "--configfile", micro, "--forcerun", "evaluate", cwd=work)
    counts = job_counts(proc.stdout)
    assert counts.get("evaluate") and not counts.get("train") and not counts.get("sample")


@pytest.mark.slow
def test_every_stage_can_be_named(micro_run, tmp_path):
    """`--until <stage>` plans that stage and what it needs, nothing after it; after a complete run,
    `--forcerun <stage>` plans every job of that stage and what depends on it, nothing before it."""
    work, _, _ = micro_run
    micro = str(ROOT / "config" / "micro.yaml")
    needs = rule_graph(tmp_path, "--configfile", micro)
    full = job_counts(snakemake("-n", "--configfile", micro, cwd=tmp_path).stdout)
    stages = stage_names()

    def plan(stage: str) -> tuple[dict, dict]:
        until = snakemake("-n", "--configfile", micro, "--until", stage, cwd=tmp_path)
        force = snakemake("-n", "--configfile", micro, "--forcerun", stage, cwd=work)
        assert until.returncode == 0, (stage, until.stderr[-2000:])
        assert force.returncode == 0, (stage, force.stderr[-2000:])
        return job_counts(until.stdout), job_counts(force.stdout)

    with ThreadPoolExecutor(max_workers=2) as pool:
        plans = dict(zip(stages, pool.map(plan, stages)))
    # a merge's parts are temporary (deleted once merged): forcing the merge makes them again
    remade = {"merge_images": {"extract_images"}, "merge_features": {"extract_features"}}
    for stage, (until, force) in plans.items():
        if stage not in full:  # fetch (nothing to download) and tradeoff (not asked for) in the micro config
            assert stage not in until and stage not in force
            continue
        assert until[stage] == full[stage], (stage, until)
        assert set(until) - {"total"} <= needs[stage] | {stage}, (stage, until)
        assert force[stage] == full[stage], (stage, force)
        assert not (needs[stage] - remade.get(stage, set())) & set(force), (stage, force)


# Settings that change how fast a job runs, never what it writes (the weights do not depend on the number of
# processes nor on micro-batches; samples not on their batch size: noise per (seed, conditioning, sample)).
THROUGHPUT = {
    "extract.batch_size": 8,
    "extract.workers": 1,
    "train.workers": 1,
    "train.log_interval": 3,
    "train.save_interval": 3,
    "train.microbatch": 4,
    "train.retries": 2,
    "sample.batch_size": 3,
    "evaluate.batch_size": 5,
    "evaluate.workers": 0,
    "tradeoff.batch_size": 7,
    "studies.batch_size": 3,
    "device": "auto",
    "trust_checkpoints": True,
    "resources.default": {"threads": 2, "mem_mb": 3000, "runtime": 30},
    "resources.train": {"gpu": 2},
}
# Settings that change results, and the stage they change: that stage and everything after it reruns.
RESULT_CHANGING = {
    "pretrain.steps": (6, "pretrain"),
    "extract.feature_dtype": ("float16", "extract_features"),
    "train.batch_size": (4, "train"),
    "sample.steps": (5, "sample"),
    "studies.steps": (3, "study"),
}
# A stage's local check job, run before it with the same inputs and options: reruns with it.
PREFLIGHT = {
    "train": {"train_check"},
    "extract_features": {"extract_features_check"},
    "sample": {"sample_check"},
    "study": {"study_check"},
}


@pytest.mark.slow
def test_reruns_follow_what_determines_results(micro_run, tmp_path):
    """After a complete run, a changed throughput setting plans no job; a changed result-changing setting
    plans exactly the jobs of its stage and of every stage after it."""
    work, _, _ = micro_run
    micro = str(ROOT / "config" / "micro.yaml")
    full = job_counts(snakemake("-n", "--configfile", micro, cwd=tmp_path).stdout)
    needs = rule_graph(tmp_path, "--configfile", micro)
    changes = THROUGHPUT | {key: value for key, (value, _) in RESULT_CHANGING.items()}

    def plan(key: str) -> dict[str, int]:
        cfg = write_config(tmp_path, "micro.yaml", name=f"{key}.yaml", **{key: changes[key]})
        proc = snakemake("-n", "--configfile", str(cfg), cwd=work)
        assert proc.returncode == 0, (key, proc.stderr[-2000:])
        return job_counts(proc.stdout)

    with ThreadPoolExecutor(max_workers=2) as pool:
        plans = dict(zip(changes, pool.map(plan, changes)))
    for key in THROUGHPUT:
        assert plans[key] == {}, f"changing {key} reruns {plans[key]}"
    for key, (_, stage) in RESULT_CHANGING.items():
        rerun = {stage} | {rule for rule, up in needs.items() if stage in up} | PREFLIGHT.get(stage, set())
        expected = {rule: count for rule, count in full.items() if rule in rerun}
        assert plans[key] == {**expected, "total": sum(expected.values())}, f"changing {key}"


@pytest.mark.slow
def test_micro_studies(micro_run):
    _, res, cfg = micro_run
    assert (res / "studies" / "probe" / "probe.pt").stat().st_size > 0
    for study in cfg["studies"]["run"]:
        sets = list(cfg["data"]["ood"]) if study == "ood" else ["val"]
        for dataset in sets:
            folder = res / "studies" / "demo" / "trunk" / dataset / study
            with Image.open(folder / f"{study}.png") as im:
                assert im.format == "PNG" and im.width > 0
            with open(folder / f"{study}.csv", newline="") as f:
                assert list(csv.DictReader(f)), f"{study}.csv has no rows"


@pytest.mark.slow
def test_micro_report(micro_run):
    work, _, _ = micro_run
    micro = str(ROOT / "config" / "micro.yaml")
    proc = snakemake("--cores", "1", "--configfile", micro, "--report", "report.html", cwd=work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    assert "grid.png" in html and "conditioned.png" in html


@pytest.mark.slow
def test_changed_encoder_trains_a_new_model(micro_run, tmp_path):
    """After a complete run, a changed encoder (pretrain.steps 5 -> 6) retrains from scratch: the new model
    differs from the old one and its log says it started afresh (no stale resume of the old checkpoints)."""
    import shutil

    import torch

    work, res, cfg = micro_run
    copy = tmp_path / "work"
    shutil.copytree(work, copy, symlinks=True)  # the complete run, its outputs' times and metadata
    ema = f"ema_{float(cfg['train']['ema_rates'][0])!r}_final.pt"
    model = Path("results") / cfg["experiment"] / "models" / "demo" / "trunk"
    old = torch.load(copy / model / ema, weights_only=True)
    changed = write_config(tmp_path, "micro.yaml", name="encoder.yaml", **{"pretrain.steps": 6})
    proc = snakemake("--cores", "2", "--configfile", str(changed), "--until", "train", cwd=copy, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (copy / "logs" / cfg["experiment"] / "train" / "demo" / "trunk.log").read_text()
    assert "starting at step 0" in log and "resuming" not in log, log[-2000:]
    new = torch.load(copy / model / ema, weights_only=True)
    assert max((new[k].float() - old[k].float()).abs().max().item() for k in old) > 0
    runs = sorted(p.name for p in (copy / "results" / cfg["experiment"] / "checkpoints").rglob("run-*"))
    assert len(runs) == 2  # the old run's checkpoints are kept apart, never resumed by the new one
