# What several rules share: output paths, the configuration's datasets and encoders, command-line options,
# per-rule resources. A rule's own parameters live in its own .smk file; functions live here only, since
# `snakemake --lint` wants no file with both rules and functions. Checks that a JSON schema can state live in
# ../schemas/config.schema.yaml, validated before this file runs.
import json
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

R = f"{config['results_dir']}/{config['experiment']}"
LOGS = f"{config['logs_dir']}/{config['experiment']}"
BENCH = f"benchmarks/{config['experiment']}"
WEIGHTS = config["weights_dir"]
LAYERS = ("trunk", "head")
DATASETS = {"train": config["data"]["train"], "val": config["data"]["val"], **config["data"]["ood"]}
ENCODERS = config["encoders"]
STUDIES = config["studies"]
RUNS = [(name, layer) for name, enc in ENCODERS.items() for layer in enc["layers"]]  # one RCDM each

# Output paths as patterns: a rule's output as they are, a concrete file with .format(dataset=..., ...).
IMAGES = f"{R}/data/{{dataset}}/images.h5"
ENCODER = f"{R}/encoders/{{encoder}}/encoder.pt"
FEATURES = f"{R}/features/{{encoder}}/{{dataset}}/{{layer}}.h5"
FEATURE_PARTS = f"{R}/features/{{encoder}}/{{dataset}}/parts-{{shard}}-of-{{num}}"  # a features job's layers
MODEL = f"{R}/models/{{encoder}}/{{layer}}"
EMA = f"{MODEL}/ema_{float(config['train']['ema_rates'][0])!r}_final.pt"  # the first rate's: sampled from
SAMPLES = f"{R}/samples/{{encoder}}/{{layer}}/{{dataset}}"
METRICS = f"{R}/metrics/{{encoder}}/{{layer}}/metrics.csv"
TRADEOFF = f"{R}/tradeoff/{{encoder}}/{{layer}}"
STUDY = f"{R}/studies/{{encoder}}/{{layer}}/{{dataset}}/{{study}}"


wildcard_constraints:
    shard=r"\d+",
    num=r"\d+",
    layer="trunk|head",
    encoder=r"[A-Za-z0-9_]+",
    dataset=r"[A-Za-z0-9_]+",


def opts(**options) -> str:
    """Command-line options from keyword arguments: `--key value`; True -> `--key`; None/False -> nothing;
    lists -> `--key a b`."""
    args = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return shlex.join(args)


def run_opts(trust: str = "", **options) -> str:
    """A stage's throughput options (how fast a job runs, never what it writes: workers, inference batch sizes,
    log/save intervals, the device, the stage's flag allowing pickled weight files). Rules pass them as the
    resource `run_opts`: Snakemake reruns a job whose params changed, never one whose resources did."""
    trust = trust if config["trust_checkpoints"] else ""
    device = opts(device=None if config["device"] == "auto" else config["device"])
    return " ".join(part for part in (opts(**options), trust, device) if part)


def extra(stage: str) -> str:
    """A stage's extra_args: options passed through verbatim to its CLI."""
    return config[stage].get("extra_args", "")


def check_shell(command: str) -> str:
    """The shell of a stage's local check job: `command`, the stage's CLI with `--check` (every input read and
    checked as the run would, on the CPU, nothing written), run on the submit host before the stage's retried
    GPU jobs, with their inputs and options. Passing, its summary line becomes the check's output, a marker
    those jobs need; failing (a permanent error: bad data or configuration), the error's one line and the
    log's path go to stderr and the job fails once, before any GPU job is submitted."""
    return (
        f"if {command} > {{log}} 2>&1; then tail -n 1 {{log}} > {{output}}; "
        "else echo \"$(tail -n 1 {log}) (log: {log})\" >&2; exit 1; fi"
    )


def write_json(path: str, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- extraction
def dataset_args(name: str) -> str:
    """The data options of `rcdm extract` for a dataset of the configuration."""
    spec = DATASETS[name]
    source = spec["path"] if spec["source"] == "folder" else spec["source"]
    args = ["--dataset", source, "--split", spec["split"] or name, "--seed", str(spec["seed"])]
    args += ["--num-images", str(spec["num_images"])] if spec.get("num_images") else []
    return shlex.join(args + (shapes_style_args() if source == "shapes" else []))


def shapes_style_args() -> list[str]:
    """`--shapes-*` options for data.shapes: only the settings that differ from the default style, so that a
    configuration which leaves them out (or spells out a default) keeps its commands, and its files."""
    from dataclasses import asdict

    from rcdm.shapes import Style

    try:
        chosen = asdict(Style(**(config["data"].get("shapes") or {})))
    except ValueError as err:
        raise WorkflowError(f"data.shapes: {err}") from None
    default = asdict(Style())
    args = []
    for key, value in chosen.items():
        if value != default[key]:
            values = value if isinstance(value, tuple) else (value,)
            flag = key.replace("_", "-")
            args += [f"--shapes-{flag}", *map(str, values)]
    return args


def extract_shards(dataset: str) -> int:
    """Extraction shards of a dataset: its own `shards`, else extract.shards."""
    return DATASETS[dataset].get("shards") or config["extract"]["shards"]


def extract_jobs(dataset: str) -> list[dict]:
    """The wildcards {shard, num} of a dataset's extraction jobs (one job: shard 0 of 1), as parts are named."""
    parts = part_files("x.h5", extract_shards(dataset))
    return [re.search(r"part-(?P<shard>\d+)-of-(?P<num>\d+)", part).groupdict() for part in parts]


def features_out(folder: str, encoder: str) -> str:
    """`--features-out` of an extraction job writing the encoder's layers into `folder`: <folder>/<layer>.h5
    for one shard, <folder>/<layer>.part-000i-of-000k.h5 (named by the CLI) for k > 1."""
    return opts(features_out=[f"{layer}={folder}/{layer}.h5" for layer in ENCODERS[encoder]["layers"]])


# Options of `rcdm extract` shared by images and features jobs: what they write, how fast
EXTRACT_OPTS = " ".join(filter(None, [opts(on_bad_image=config["data"]["on_bad_image"]), extra("extract")]))
EXTRACT_RUN = {k: config["extract"][k] for k in ("batch_size", "workers")}


def part_files(path: str, num_shards: int) -> list[str]:
    """The shard file names the stage CLIs write for `path` (X.h5 -> X.part-000i-of-000k.h5)."""
    from rcdm.formats.hdf5 import part_path

    return [str(part_path(path, i, num_shards)) for i in range(num_shards)]


def part_pattern(path: str) -> str:
    """Output pattern of one shard of `path`: X.part-{shard}-of-{num}.h5."""
    stem, suffix = path.rsplit(".", 1)
    return f"{stem}.part-{{shard}}-of-{{num}}.{suffix}"


def shard_file(path: str, shard: int, num_shards: int) -> str:
    """The file a stage CLI writes for `path` as shard `shard` of `num_shards`: `path` itself for one shard."""
    return path if num_shards == 1 else part_files(path, num_shards)[shard]


def shard_args(wildcards) -> str:
    return f"--shard {int(wildcards.shard)} --num-shards {int(wildcards.num)}"


# ---------------------------------------------------------------------------------------------- encoders
def weight_file(name: str) -> str:
    """A registered weight file in weights_dir: missing and not fetchable is an error naming file and URL."""
    from rcdm.weights import entry

    w = entry(name)
    path = f"{WEIGHTS}/{w.filename}"
    if not config["fetch_weights"] and not Path(path).is_file():
        raise WorkflowError(
            f"weight file {w.filename!r} ({w.description}) is missing from weights_dir {WEIGHTS!r}. Download "
            f"{w.url} into it, run `rcdm fetch --weights-dir {WEIGHTS} {w.name}`, or set fetch_weights: true."
        )
    return path


def encoder_file(encoder: str) -> str:
    enc = ENCODERS[encoder]
    if enc["source"] == "pretrain":
        return ENCODER.format(encoder=encoder)
    if enc["source"] == "published" and not enc.get("file"):
        return weight_file(encoder)
    return f"{WEIGHTS}/{enc['file']}"


def encoder_args(encoder: str) -> str:
    """`--encoder NAME --encoder-checkpoint FILE` for the stage CLIs."""
    enc = ENCODERS[encoder]
    kind = {"pretrain": "small", "published": encoder, "custom": enc.get("factory")}[enc["source"]]
    return shlex.join(["--encoder", kind, "--encoder-checkpoint", encoder_file(encoder)])


# ---------------------------------------------------------------------------------------------- RCDM models
def rcdm_choice(encoder: str, layer: str) -> str:
    """Where the RCDM of (encoder, layer) comes from (encoders.<name>.rcdm): `train`, `published` or a file."""
    choice = ENCODERS[encoder].get("rcdm") or "train"
    return choice.get(layer, "train") if isinstance(choice, dict) else choice


def rcdm_files(encoder: str, layer: str) -> dict:
    """The RCDM of (encoder, layer) as {checkpoint, flags}, the files sample, tradeoff and study jobs load.
    Trained here (the EMA export of `train`, with the flags of its train_summary.json), or a file in weights_dir
    (`published`, the published checkpoint's registry name, or the file named) with the flags read off it."""
    from rcdm.weights import rcdm_checkpoint_name

    choice, model = rcdm_choice(encoder, layer), MODEL.format(encoder=encoder, layer=layer)
    if choice == "train":
        return {"checkpoint": EMA.format(encoder=encoder, layer=layer), "flags": f"{model}/model_flags.json"}
    if choice == "published":
        try:
            choice = weight_file(rcdm_checkpoint_name(encoder, layer)).rsplit("/", 1)[1]
        except KeyError as err:
            raise WorkflowError(f"encoders.{encoder}.rcdm: {err.args[0]}") from None
    return {"checkpoint": f"{WEIGHTS}/{choice}", "flags": f"{model}/file_flags.json"}


# ---------------------------------------------------------------------------------------------- studies
PROBE = STUDIES["probe"] and config["data"]["train"]["source"] == "shapes"  # the shapes factor probe
STUDY_OPTS = opts(**{k: STUDIES[k] for k in ("num_images", "samples", "sampler", "steps")}, seed=config["seed"])
FIRST_LAYER = {"trunk": "trunk", "head": "head", "both": "trunk"}  # the model `--checkpoint` loads


def study_inputs(encoder: str, layer: str, dataset: str, study: str) -> dict:
    """The files one study job reads ([] for none); `layer` both: trunk-head, the trunk's model first and the
    head's as its second."""
    first = rcdm_files(encoder, FIRST_LAYER[layer])
    head = rcdm_files(encoder, "head") if layer == "both" else {}
    return {
        "checkpoint": first["checkpoint"],
        "flags": first["flags"],
        "encoder": encoder_file(encoder),
        "images": IMAGES.format(dataset=dataset),
        "features": FEATURES.format(encoder=encoder, dataset=dataset, layer=FIRST_LAYER[layer]),
        "head_checkpoint": head.get("checkpoint", []),
        "head_flags": head.get("flags", []),
        "head_features": FEATURES.format(encoder=encoder, dataset=dataset, layer="head") if head else [],
        "probe": f"{R}/studies/probe/probe.pt" if PROBE else [],
        "classifier": study_classifier(study),  # adversarial: the supervised comparison
    }


def study_command(encoder: str, layer: str, dataset: str, study: str) -> str:
    """`rcdm study <study> ...` of one study job, on the files of study_inputs, without its throughput options
    (the resource run_opts): what the study job runs, and what its model's study_check job checks."""
    f = study_inputs(encoder, layer, dataset, study)
    return " ".join(
        part
        for part in (
            shlex.join(["rcdm", "study", study, "--checkpoint", f["checkpoint"], "--model-flags", f["flags"]]),
            opts(
                head_checkpoint=f["head_checkpoint"] or None,
                head_model_flags=f["head_flags"] or None,
                head_features=f["head_features"] or None,
            ),
            f"{encoder_args(encoder)} --encoder-name {encoder}",
            opts(layer=None if layer == "both" else layer, images=f["images"], features=f["features"]),
            opts(probe=f["probe"] or None, classifier=f["classifier"] or None),
            STUDY_OPTS,
            STUDIES["extra_args"].get(study, ""),
            opts(out=STUDY.format(encoder=encoder, layer=layer, dataset=dataset, study=study)),
        )
        if part
    )


def study_classifier(study: str) -> str | list:
    """The image classifier file a study job reads ([] for none): the adversarial study's supervised comparison
    (studies.adversarial_classifier). `supervised`: torchvision's ResNet-50 with its fc, the registry's file in
    weights_dir (fetched like the encoders' files); `probe`: the shapes factor probe that the
    study_probe job trains; otherwise a file name in weights_dir."""
    choice = STUDIES["adversarial_classifier"]
    if study != "adversarial" or not choice:
        return []
    if choice == "supervised":
        return weight_file("supervised")
    if choice == "probe":
        if not (STUDIES["probe"] and config["data"]["train"]["source"] == "shapes"):
            raise WorkflowError(
                "studies.adversarial_classifier: probe needs the shapes factor probe (studies.probe: true and "
                "data.train.source: shapes); set it to supervised, a classifier file in weights_dir, or null."
            )
        return f"{R}/studies/probe/probe.pt"
    return f"{WEIGHTS}/{choice}"


# ---------------------------------------------------------------------------------------------- resources
_GPU_KEYS = {"gpu", "gpu_model", "cpus_per_gpu", "tasks_per_gpu"}
_RESOURCE_KEYS = {"mem_mb", "runtime", "nodes", "slurm_partition", "slurm_account", "constraint", "qos"}
_RESOURCE_KEYS |= {"slurm_extra", *_GPU_KEYS}


def _rule_config(rule: str) -> dict:
    """`default` updated with the rule's own entry."""
    merged = {**config["resources"].get("default", {}), **config["resources"].get(rule, {})}
    return {k: v for k, v in merged.items() if v is not None and v != ""}


def rule_threads(rule: str) -> int:
    return int(_rule_config(rule).get("threads", 1))


def rule_resources(rule: str) -> dict:
    """A rule's Snakemake resources (SLURM requests; local limits with --resources); GPU keys need gpu > 0.
    Memory grows with each retry (attempt 2 asks twice `mem_mb`), except training's: a train job is resubmitted
    to continue after a time limit, not because it ran out of memory."""
    res = {k: v for k, v in _rule_config(rule).items() if k in _RESOURCE_KEYS}
    if "mem_mb" in res and "train" != rule:  # operands so ordered for snakemake --lint (mixed-rules regex)
        res["mem_mb"] = lambda wildcards, attempt, base=int(res["mem_mb"]): base * attempt
    return res if res.get("gpu") else {k: v for k, v in res.items() if k not in _GPU_KEYS}


def rule_retries(rule: str) -> int:
    """Resubmissions of a failed job (`resources.<rule>.retries`, else `resources.default.retries`)."""
    return int(_rule_config(rule).get("retries", 0))


def train_resources() -> dict:
    """The train rule's resources and `launcher` (the words before `rcdm train`, rcdm.distributed.torchrun_launcher).
    One node: `gpu` GPUs (--gpus), torchrun with one process per GPU when several. `nodes` > 1: one task per
    node (tasks; mpi: the job's shell runs srun itself), each with `gpu` GPUs of its node (--gres=gpu[:model]:N;
    no --ntasks-per-gpu), `threads` CPUs and `mem_mb` per node, torchrun with a c10d rendezvous on the first."""
    from rcdm.distributed import torchrun_launcher

    res = {"gpu": 0, **rule_resources("train")}
    nodes, gpus = int(res.get("nodes") or 1), int(res["gpu"])
    if nodes > 1:
        model = res.pop("gpu_model", None)
        res.update(gpu=0, mpi="srun", tasks=nodes, tasks_per_gpu=0)
        if gpus:
            res["gres"] = ":".join(["gpu", *([model] if model else []), str(gpus)])
    return {**res, "launcher": torchrun_launcher(nodes, max(gpus, 1), rule_threads("train"), gpus)}
