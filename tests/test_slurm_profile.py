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
