"""The micro workflow through `snakemake --profile slurm`, against a real one-node SLURM cluster on localhost.

CI starts the cluster with ../shared/slurm/up.sh (Debian's slurm-wlm and munge); where SLURM is not installed
or not running, the test skips and says why. Snakemake runs from the repository root, as users type it, under
`timeout -k` (a SLURM executor that loses its status command can hang).
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Only for the localhost cluster: it has no accounting database (squeue instead of sacct), answers at once,
# and shares this machine's file system; a real cluster takes these from slurm/config.yaml.
LOCAL_CLUSTER_FLAGS = [
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--latency-wait", "5",
    "--jobs", "2",
]  # fmt: skip


def _cluster_problem() -> str | None:
    for tool in ("sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not found: SLURM is not installed (CI installs it with ../shared/slurm/up.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out: slurmctld is not answering"
    if "UP" not in ping.stdout:
        found = (ping.stdout + ping.stderr).strip()
        return f"slurmctld is not up ({found}); start it with ../shared/slurm/up.sh"
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    if not any(s.strip().startswith(("idle", "mix", "alloc")) for s in state.splitlines()):
        return f"no SLURM node is usable (states: {state.split()})"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def test_profile_is_found_from_the_repository_root():
    """`--profile slurm` resolves to ./slurm: its settings show in a dry run (no cluster needed)."""
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "default-resources" not in profile  # per-rule resources come from the workflow configuration
    default = yaml.safe_load((ROOT / "workflow" / "profiles" / "default" / "config.yaml").read_text())
    # the automatic workflow profile would replace these keys of the SLURM profile whole
    assert not {"executor", "default-resources", "cores", "jobs"} & set(default)


def test_gpu_jobs_get_the_task_geometry_asked_for():
    """The plugin's sbatch line (no cluster needed): a multi-GPU job gets no implicit --ntasks-per-gpu
    (plugins up to 2.7.0 added --ntasks-per-gpu=1, running the command once per GPU); tasks_per_gpu and
    nodes from the configuration's resources are passed as given."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    def sbatch(**resources) -> str:
        job = SimpleNamespace(resources=Resources(resources, mem_mb=1000, runtime=60), threads=64)
        params = dict(run_uuid="u", slurm_logfile="l", comment_str="c", account="", partition="", workdir="")
        return f"{get_submit_command(job, params)} {set_gres_string(job)}"

    plain = sbatch(gpu=8)
    assert "--gpus=8" in plain and "--cpus-per-task=64" in plain
    assert "--ntasks-per-gpu" not in plain and "--nodes" not in plain
    asked = sbatch(gpu=8, tasks_per_gpu=1, nodes=2)
    assert "--ntasks-per-gpu=1" in asked and "--nodes=2" in asked


def test_micro_workflow_through_slurm(cluster, tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    # keep the DAG to a handful of cluster jobs (each costs ~10-15 s of scheduling and polling here), and
    # still fan one stage out over shards
    cfg["data"]["ood"] = {}
    cfg["extract"]["shards"] = 1
    cfg["sample"]["shards"] = 2
    cfg["resources"] = {"default": {"threads": 1, "mem_mb": 1500, "runtime": 10}}
    path = tmp_path / "slurm_micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = ["timeout", "-k", "10", "1500", sys.executable, "-m", "snakemake", "--profile", "slurm"]
    cmd += LOCAL_CLUSTER_FLAGS + ["--configfile", str(path), "--directory", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1560)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "has been submitted with SLURM jobid" in out
    res = tmp_path / "results" / cfg["experiment"]
    with open(res / "metrics" / "demo" / "trunk" / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    n = cfg["sample"]["num_conditionings"]
    assert int(row["n_samples"]) == n * cfg["sample"]["samples_per_image"]
    assert 1 / n <= float(row["mrr"]) <= 1
    assert (res / "samples" / "demo" / "trunk" / "val" / "grid.png").stat().st_size > 0
    # the profile groups the two sampling shards into one submission; the kept copies went with the run
    assert re.search(r"\] Group job sample_demo_trunk_val \(jobs in lexicogr", out), out[-3000:]
    assert not (res / ".finished").exists()


# ----------------------------------------------------------------------- job arrays (not in the profile)
ARRAY_SNAKEFILE = """
rule all:
    input: expand("out/{{i}}.txt", i=range({n}))

rule shard:
    output: "out/{{i}}.txt"
    resources: mem_mb=200, runtime=5
    shell: {shell!r}
"""


def _array_run(tmp_path: Path, n: int, shell: str, *flags: str, limit: int) -> subprocess.CompletedProcess:
    """`snakemake --executor slurm --slurm-array-jobs shard` on a workflow of `n` shard jobs, stopped with
    SIGINT (Snakemake cancels its SLURM jobs and exits; `timeout` then returns 124) after `limit` seconds."""
    (tmp_path / "Snakefile").write_text(ARRAY_SNAKEFILE.format(n=n, shell=shell))
    cmd = ["timeout", "-s", "INT", "-k", "10", str(limit), sys.executable, "-m", "snakemake"]
    cmd += ["--executor", "slurm"]
    cmd += ["--slurm-array-jobs", "shard", *LOCAL_CLUSTER_FLAGS[:4], "--latency-wait", "2", *flags]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=limit + 60)


def test_plugin_array_tasks_check_the_first_tasks_outputs(cluster, tmp_path):
    """Why slurm/config.yaml submits no job arrays (1 of 2): in an array job of the installed plugin, every
    task but the first runs its own job, then checks the FIRST job's outputs and fails while the first task
    still runs (or after a downstream job has removed them), upstream snakemake-executor-plugin-slurm#447.
    Task 1 here waits until task 2 has started and then for 20 s more."""
    shell = (
        "t=${{SLURM_ARRAY_TASK_ID:-0}}; touch started.$t; "
        "if [ $t = 1 ]; then for s in $(seq 60); do [ -e started.2 ] && break; sleep 1; done; sleep 20; fi; "
        "touch {output}"
    )
    proc = _array_run(tmp_path, 2, shell, "--jobs", "2", limit=300)
    out = proc.stdout + proc.stderr
    arrays = re.findall(r"Submitted array job with Snakemake IDs (\d+),(\d+) and SLURM job ID (\d+)\.", out)
    assert len(arrays) == 1, f"the two shards were not one array job\n{out[-3000:]}"
    first_job, _, array_id = arrays[0]
    outputs = dict(re.findall(r"^    output: (\S+)\n    jobid: (\d+)$", out, flags=re.M))
    first_output = {jobid: path for path, jobid in outputs.items()}[first_job]
    task2 = (tmp_path / ".snakemake" / "slurm_logs" / "rule_shard" / f"{array_id}_2.log").read_text()
    fixed = "MissingOutputException" not in task2
    assert not fixed, (
        "task 2 of the array no longer fails on task 1's outputs: the plugin may be fixed (or the tasks did "
        f"not overlap); try slurm-array-jobs in slurm/config.yaml again\n{task2[-3000:]}"
    )
    assert re.search(rf"^{re.escape(first_output)} \(missing locally", task2, flags=re.M), task2[-3000:]
    assert proc.returncode != 0


def test_plugin_drops_array_jobs_it_is_not_handed_all_of(cluster, tmp_path):
    """Why slurm/config.yaml submits no job arrays (2 of 2): when Snakemake hands the plugin fewer of a rule's
    ready jobs than remain ready (here --jobs 2 with 5 ready), it submits none of them and never will; the
    run waits forever with nothing queued (upstream snakemake-executor-plugin-slurm#473)."""
    proc = _array_run(tmp_path, 5, "touch {output}", "--jobs", "2", "--verbose", limit=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 124, out[-3000:]  # still waiting when `timeout` stopped it
    assert "Array job collection incomplete for rule shard: 2/3 arrived" in out, out[-3000:]
    assert "Submitted array job" not in out and "has been submitted with SLURM jobid" not in out


# ------------------------------------------------------------------------------------------ grouped jobs
# Snakemake job grouping, as slurm/config.yaml switches it on for the shard rules of the workflow: each rule's
# shards of one set (and model) in a group, `group-components` of them per sbatch submission. `shard_slots`
# (local scope, 1 per group) makes Snakemake lay the group's jobs out one after another, so a group asks for
# one shard's GPU, CPUs and memory and the sum of their runtimes; without it Snakemake sums GPUs, threads and
# memory over the group (8 one-GPU shards: --gpus=8) while the plugin's in-job Snakemake runs them one at a
# time anyway (`--jobs 1`).
SHARD_RULES = {
    "extract_images": "{dataset}",
    "extract_features": "{encoder}_{dataset}",
    "sample": "{encoder}_{layer}_{dataset}",
}


def group_flags(rules: dict[str, str], per_group: int) -> list[str]:
    groups = {rule: f"{rule}_{wildcards}" for rule, wildcards in rules.items()}
    return [
        "--groups", *(f"{rule}={group}" for rule, group in groups.items()),
        "--group-components", *(f"{group}={per_group}" for group in groups.values()),
        "--resources", "shard_slots=1",
        "--set-resource-scopes", "shard_slots=local",
        "--set-resources", *(f"{rule}:shard_slots=1" for rule in rules),
    ]  # fmt: skip


def local_rules() -> set[str]:
    """The workflow's rules that run on the head node (`localrule: True`, `localrules:`), and `all`."""
    names = {"all"}
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t].*\n|\n)*)", text, flags=re.M):
            if re.search(r"^\s+localrule: True", body, flags=re.M):
                names.add(name)
        for listed in re.findall(r"^localrules:(.*(?:\n[ \t]+.*)*)", text, flags=re.M):
            names.update(re.findall(r"\w+", listed))
    return names


def test_grouping_the_shard_rules_cuts_submissions(tmp_path):
    """A dry run of config/imagenet.yaml through the profile (no cluster needed): 1,031 cluster jobs, each
    its own sbatch submission ungrouped; the profile groups the 897 shards 8 per submission: 266 submissions
    (132 group jobs and 134 other jobs). The groups are those of group_flags below."""
    for split, n in {"train": 256, "val": 128}.items():  # as tests/test_workflow.py: empty files stand in
        (tmp_path / split).mkdir()
        for i in range(n):
            (tmp_path / split / f"{i:05d}.JPEG").touch()
    cfg = yaml.safe_load((ROOT / "config" / "imagenet.yaml").read_text())
    for split in ("train", "val"):
        cfg["data"][split]["path"] = str(tmp_path / split)
    (tmp_path / "imagenet.yaml").write_text(yaml.safe_dump(cfg))
    local = local_rules()

    def submissions(*flags: str) -> tuple[int, int, int]:
        cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "slurm", "--directory", str(tmp_path)]
        cmd += ["--configfile", str(tmp_path / "imagenet.yaml"), *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        table = proc.stdout[proc.stdout.index("Job stats:") :]
        counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}
        cluster = sum(n for rule, n in counts.items() if rule not in local | {"total"})
        shards = sum(counts[rule] for rule in SHARD_RULES)
        groups = re.findall(r"\] Group job (\w+) \(jobs in lexicogr", proc.stdout)
        assert all(group.startswith(tuple(SHARD_RULES)) for group in groups)
        return cluster, shards, cluster - (shards if groups else 0) + len(groups)

    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    flags = group_flags(SHARD_RULES, 8)
    components = flags.index("--group-components")
    assert profile["groups"] == flags[1:components]
    assert profile["group-components"] == flags[components + 1 : flags.index("--resources")]
    assert profile["resources"] == ["shard_slots=1"]
    assert profile["set-resource-scopes"] == ["shard_slots=local"]
    assert submissions() == (1031, 897, 266)


GROUP_SNAKEFILE = """
rule all:
    input: expand("out/{i}.txt", i=range(3))

rule shard:
    output: "out/{i}.txt"
    resources: mem_mb=200, runtime=5, gpu=1
    shell:
        "echo {wildcards.i} >> order; "
        "if [ $(wc -l < order) = 2 ]; then exit 3; fi; "  # the second shard to run fails
        "touch {output}"
"""


def test_group_job_loses_its_finished_shards_when_one_fails(cluster, tmp_path):
    """Snakemake's side of grouping, why the shard stages keep their finished outputs (rcdm.finished; the test
    below): three one-GPU shards grouped into one submission ask for what one shard needs (--gpus=1, --mem
    200) and three shards' runtime (-t 15), and run one after another in that job. But when one of them
    fails, the whole group fails: the main Snakemake reports every shard as failed (`keep-going` does not
    apply within a group), deletes the outputs of the shards that had finished, and the shards after the
    failing one never run (the in-job Snakemake stops at the first error). The same holds for a group that
    reaches its time limit; a retry resubmits the whole group, finished shards included."""
    (tmp_path / "Snakefile").write_text(GROUP_SNAKEFILE)
    cmd = ["timeout", "-s", "INT", "-k", "10", "300", sys.executable, "-m", "snakemake"]
    cmd += [
        "--executor",
        "slurm",
        *LOCAL_CLUSTER_FLAGS,
        "--keep-going",
        "--verbose",
        *group_flags({"shard": "all"}, 3),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=360)
    out = proc.stdout + proc.stderr
    assert out.count("has been submitted with SLURM jobid") == 1, out[-3000:]  # one submission, three shards
    (sbatch,) = re.findall(r"^sbatch call: (.*)$", out, flags=re.M)
    assert " -t 15 " in sbatch and " --mem 200 " in sbatch and "--gpus=1" in sbatch, sbatch[:500]
    order = (tmp_path / "order").read_text().split()
    assert len(order) == 2, order  # the third shard never started
    first = f"out/{order[0]}.txt"
    kept = (tmp_path / first).exists()
    assert not kept, (
        f"{first} (finished before another shard of its group failed) was kept: Snakemake no longer deletes "
        "a failed group's finished shards; rcdm.finished's kept copies may no longer be needed"
    )
    removed = "Removing output files of failed job shard since they might be corrupted:"
    assert re.search(rf"{removed}\n{re.escape(first)}$", out, flags=re.M), out[-3000:]
    assert out.count("Error in rule shard:") == 3, out[-3000:]  # all three reported failed, one did
    assert proc.returncode == 1, out[-3000:]


KEPT_SNAKEFILE = """
import os
import uuid
from rcdm import finished

if workflow.is_main_process:  # as the workflow's Snakefile sets it: a folder per run
    os.environ[finished.ENV] = os.path.abspath(f".finished/{uuid.uuid4().hex}")

rule all:
    input: "images.h5"

rule merge:
    input: [f"images.part-{i:04d}-of-0003.h5" for i in range(3)]
    output: "images.h5"
    localrule: True
    shell: "rcdm merge-extract --out {output} --parts {input} --quick --no-progress 2> merge.log"

rule shard:
    output: "images.part-{i}-of-0003.h5"
    log: "logs/{i}.log"
    resources: mem_mb=500, runtime=5, shard_slots=1
    retries: 1
    shell:
        "echo {wildcards.i} $SLURM_JOB_ID >> order; "
        "[ -e first_job ] || echo $SLURM_JOB_ID > first_job; "
        # the second shard to run fails in every try of the group's first submission
        "if [ $SLURM_JOB_ID = $(cat first_job) ] && [ {wildcards.i} = $(sed -n 2p order | cut -d' ' -f1) ]; "
        "then exit 3; fi; "
        "rcdm extract --dataset shapes --split val --num-images 24 --native-size 16 --image-size 8 "
        "--images-out images.h5 --shard $((10#{wildcards.i})) --num-shards 3 --workers 0 --no-progress "
        "2> {log}"
"""


def test_group_retry_links_back_the_shards_it_finished(cluster, tmp_path):
    """What makes grouping safe for the workflow's shard rules: `rcdm extract` shards (as extract_images)
    grouped into one submission with one retry, the second shard to run failing throughout the first
    submission. It finishes shard A, then B fails; Snakemake deletes A's output and resubmits the group. The
    resubmission links A back from the copy it kept in .finished/<run> (no image decoded again), computes B
    and C, and the merge forgets the copies."""
    (tmp_path / "Snakefile").write_text(KEPT_SNAKEFILE)
    cmd = ["timeout", "-s", "INT", "-k", "10", "400", sys.executable, "-m", "snakemake"]
    cmd += ["--executor", "slurm", *LOCAL_CLUSTER_FLAGS, "--keep-going", "--verbose"]
    cmd += ["--groups", "shard=shards", "--group-components", "shards=3", "--resources", "shard_slots=1"]
    cmd += ["--set-resource-scopes", "shard_slots=local"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=460)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == 2, out[-3000:]  # the group, then its resubmission
    runs = [line.split() for line in (tmp_path / "order").read_text().splitlines()]
    first_try = [shard for shard, job in runs if job == submitted[0]]
    second_try = [shard for shard, job in runs if job == submitted[1]]
    finished_first, failing = first_try[0], first_try[1]
    assert set(first_try[1:]) == {failing} and sorted(second_try) == ["0000", "0001", "0002"], runs
    removed = "Removing output files of failed job shard since they might be corrupted:"
    assert re.search(rf"{removed}\nimages.part-{finished_first}-of-0003.h5$", out, flags=re.M), out[-3000:]
    logs = {shard: (tmp_path / "logs" / f"{shard}.log").read_text() for shard in second_try}
    (run,) = (tmp_path / ".finished").iterdir()
    restored = f"images.part-{finished_first}-of-0003.h5 restored from its kept copy {run}/"
    assert restored in logs[finished_first] and "wrote" not in logs[finished_first]
    for shard in set(second_try) - {finished_first}:
        assert "restored" not in logs[shard] and "wrote images.part" in logs[shard], logs[shard]
    assert not [p for p in run.rglob("*") if p.is_file()]  # the merge forgot them
    from rcdm.formats import hdf5

    merged = hdf5.check_images_file(tmp_path / "images.h5")
    assert merged["num_images"] == 24 and merged["merged_parts"] == 3
