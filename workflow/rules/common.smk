# Helpers shared by the rules: paths, per-rule resources, and the command-line arguments each stage gets.
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

R = f"{config['results_dir']}/{config['experiment']}"
LOGS = f"{config['logs_dir']}/{config['experiment']}"
BENCH = f"benchmarks/{config['experiment']}"
WEIGHTS = config["weights_dir"]
LAYERS = ("trunk", "head")


wildcard_constraints:
    shard=r"\d+",
    num=r"\d+",
    layer="trunk|head",
    encoder=r"[A-Za-z0-9_]+",
    dataset=r"[A-Za-z0-9_]+",


# ---------------------------------------------------------------------------------------------- datasets
def _datasets() -> dict:
    """Every dataset the workflow reads, by name: train, val, and the OOD sets."""
    data = config["data"]
    clash = {"train", "val"} & set(data["ood"])
    if clash:
        raise WorkflowError(f"config data.ood: the names {sorted(clash)} are reserved for data.train/data.val")
    for name in data["ood"]:
        if not name.replace("_", "").isalnum():
            raise WorkflowError(f"config data.ood: name {name!r} may hold only letters, digits and '_'")
    sets = {"train": data["train"], "val": data["val"], **data["ood"]}
    for name, spec in sets.items():
        if spec["source"] == "folder" and not spec.get("path"):
            raise WorkflowError(f"config data: dataset {name!r} has source 'folder' but no 'path'")
    return sets


DATASETS = _datasets()


def dataset_args(name: str) -> str:
    """The data options of `rcdm extract` / `rcdm sample` for a dataset of the configuration."""
    spec = DATASETS[name]
    source = spec["path"] if spec["source"] == "folder" else spec["source"]
    args = ["--dataset", source, "--split", spec["split"] or name, "--seed", str(spec["seed"])]
    if spec.get("num_images"):
        args += ["--num-images", str(spec["num_images"])]
    return shlex.join(args)


def images_file(dataset: str) -> str:
    return f"{R}/data/{dataset}/images.h5"


def extract_shards(dataset: str) -> int:
    """Extraction shards of a dataset: its own `shards`, else extract.shards."""
    return DATASETS[dataset].get("shards") or config["extract"]["shards"]


def sample_shards(dataset: str) -> int:
    """Sampling shards: sample.shards for val; the OOD sets are small, one shard each."""
    return 1 if dataset in config["data"]["ood"] else config["sample"]["shards"]


def datasets_regex(sharded: bool) -> str:
    """Wildcard constraint matching the datasets extracted in shards (True) or in one job (False)."""
    names = [name for name in DATASETS if (extract_shards(name) > 1) == sharded]
    return "|".join(names) if names else "(?!x)x"


def part_files(path: str, num_shards: int) -> list[str]:
    """The shard file names the stage CLIs write for `path` (X.h5 -> X.part-000i-of-000k.h5)."""
    from rcdm.formats.hdf5 import part_path

    return [str(part_path(path, i, num_shards)) for i in range(num_shards)]


def part_pattern(path: str) -> str:
    """Output pattern of one shard of `path`: X.part-{shard}-of-{num}.h5."""
    stem, suffix = path.rsplit(".", 1)
    return f"{stem}.part-{{shard}}-of-{{num}}.{suffix}"


def shard_args(wildcards) -> str:
    return f"--shard {int(wildcards.shard)} --num-shards {int(wildcards.num)}"


# ---------------------------------------------------------------------------------------------- encoders
ENCODERS = config["encoders"]


def _check_encoders() -> None:
    for name, enc in ENCODERS.items():
        if not name.replace("_", "").isalnum():
            raise WorkflowError(f"config encoders: name {name!r} may hold only letters, digits and '_'")
        if enc["source"] == "custom" and not (enc.get("factory") and enc.get("file")):
            raise WorkflowError(f"config encoders.{name}: a custom encoder needs 'factory' and 'file'")
        if enc["source"] == "published":
            from rcdm.weights import REGISTRY

            if name not in REGISTRY or REGISTRY[name].kind != "encoder":
                known = sorted(k for k, w in REGISTRY.items() if w.kind == "encoder")
                raise WorkflowError(f"config encoders.{name}: no published encoder {name!r} (known: {known})")


_check_encoders()


def runs() -> list[tuple[str, str]]:
    """Every (encoder, layer) pair an RCDM is trained for."""
    return [(name, layer) for name, enc in ENCODERS.items() for layer in enc["layers"]]


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
        return f"{R}/encoders/{encoder}/encoder.pt"
    if enc["source"] == "published" and not enc.get("file"):
        return weight_file(encoder)
    return f"{WEIGHTS}/{enc['file']}"


def encoder_args(encoder: str) -> str:
    """`--encoder NAME --encoder-checkpoint FILE` for the stage CLIs."""
    enc = ENCODERS[encoder]
    kind = {"pretrain": "small", "published": encoder, "custom": enc.get("factory")}[enc["source"]]
    return shlex.join(["--encoder", kind, "--encoder-checkpoint", encoder_file(encoder)])


def trust_flag(flag: str = "--trust-checkpoint") -> str:
    return flag if config["trust_checkpoints"] else ""


def opts(**options) -> str:
    """Command-line options from keyword arguments: `--key value`; True -> `--key`; None/False -> nothing;
    lists -> `--key a b`. Rules pass config values through params this way (provenance, rerun on change)."""
    args = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def device_opt() -> str:
    return opts(device=None if config["device"] == "auto" else config["device"])


def features_file(encoder: str, dataset: str, layer: str) -> str:
    return f"{R}/features/{encoder}/{dataset}/{layer}.h5"


# ---------------------------------------------------------------------------------------------- resources
_RESOURCE_KEYS = (
    "mem_mb",
    "runtime",
    "gpu",
    "gpu_model",
    "cpus_per_gpu",
    "slurm_partition",
    "slurm_account",
    "constraint",
    "qos",
    "slurm_extra",
)


def _rule_config(rule: str) -> dict:
    res = config["resources"]
    merged = {**res.get("default", {}), **res.get(rule, {})}
    return {k: v for k, v in merged.items() if v is not None and v != ""}


def rule_threads(rule: str) -> int:
    return int(_rule_config(rule).get("threads", 1))


def rule_resources(rule: str) -> dict:
    """Snakemake resources of a rule (SLURM requests; limits locally with --resources); gpu=0 is left out."""
    res = {k: v for k, v in _rule_config(rule).items() if k in _RESOURCE_KEYS}
    if not res.get("gpu"):
        res.pop("gpu", None)
        res.pop("gpu_model", None)
        res.pop("cpus_per_gpu", None)
    return res


def extra(stage: str) -> str:
    """A stage's extra_args: options passed through verbatim to its CLI."""
    return config[stage].get("extra_args", "")


# ---------------------------------------------------------------------------------------------- data
def extract_run_opts() -> str:
    """Options of `rcdm extract` shared by images and features jobs."""
    ex = config["extract"]
    run_opts = opts(on_bad_image=config["data"]["on_bad_image"], batch_size=ex["batch_size"], workers=ex["workers"])
    return f"{run_opts} {device_opt()} {ex['extra_args']}".strip()


def features_out(encoder: str, layers: list[str]):
    """The --features-out option of an encoder's extraction job, as a params function of the wildcards."""
    return lambda wc: opts(features_out=[f"{l}={features_file(encoder, wc.dataset, l)}" for l in layers])


# ---------------------------------------------------------------------------------------------- train
def model_dir(encoder: str, layer: str) -> str:
    return f"{R}/models/{encoder}/{layer}"


def ema_file(encoder: str, layer: str) -> str:
    """The EMA export (first configured rate) that sampling and the studies load."""
    return f"{model_dir(encoder, layer)}/ema_{float(config['train']['ema_rates'][0])!r}_final.pt"


def checkpoint_dir(encoder: str, layer: str) -> str:
    """Resumable training state, outside the declared outputs; one folder per model configuration, so a rerun
    with the same flags resumes while changed flags start afresh (old checkpoints stay until deleted)."""
    import hashlib
    import json

    flags = json.dumps({**config["model"], "image_size": config["data"]["image_size"]}, sort_keys=True)
    return f"{R}/checkpoints/{encoder}/{layer}/{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def train_launcher(wildcards, resources) -> str:
    """`rcdm` for one process; torchrun with one process per GPU when the rule has several GPUs."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    return f"torchrun --standalone --nproc-per-node={gpus} -m rcdm" if gpus > 1 else "rcdm"


def train_opts() -> str:
    t = config["train"]
    return opts(
        steps=t["steps"],
        time_budget=t["time_budget"] or 0,
        batch_size=t["batch_size"],
        microbatch=t["microbatch"],
        lr=t["lr"],
        weight_decay=t["weight_decay"],
        ema=t["ema_rates"],
        precision=t["precision"],
        save_interval=t["save_interval"],
        log_interval=t["log_interval"],
        workers=t["workers"],
        seed=config["seed"],
    )


def write_json(path: str, obj) -> None:
    import json

    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    import json

    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- sample
def samples_h5(encoder: str, layer: str, dataset: str) -> str:
    return f"{R}/samples/{encoder}/{layer}/{dataset}/samples.h5"


def samples_npz(encoder: str, layer: str, dataset: str) -> str:
    return f"{R}/samples/{encoder}/{layer}/{dataset}/samples.npz"


def sample_counts(dataset: str) -> tuple[int | None, int]:
    """(conditionings, samples each): the metrics' settings for val, the grids' for the OOD sets."""
    if dataset in config["data"]["ood"]:
        return config["ood"]["num_images"], config["ood"]["samples_per_image"]
    return config["sample"]["num_conditionings"], config["sample"]["samples_per_image"]


def sample_opts(dataset: str) -> str:
    s = config["sample"]
    n, k = sample_counts(dataset)
    return opts(
        num_images=n,
        subset_seed=config["seed"],
        samples_per_image=k,
        sampler=s["sampler"],
        steps=s["steps"],
        eta=s["eta"],
        no_clip=not s["clip_denoised"],
        seed=config["seed"],
        batch_size=s["batch_size"],
        precision=s["precision"],
    )


# ---------------------------------------------------------------------------------------------- evaluate
def metrics_file(encoder: str, layer: str) -> str:
    return f"{R}/metrics/{encoder}/{layer}/metrics.csv"


def evaluate_inputs(wildcards) -> dict:
    inputs = {
        "samples": samples_npz(wildcards.encoder, wildcards.layer, "val"),
        "features": features_file(wildcards.encoder, "val", wildcards.layer),
        "encoder": encoder_file(wildcards.encoder),
        "reference": images_file("val"),
    }
    if config["evaluate"]["require_fid"]:
        inputs["inception"] = weight_file("inception")
    return inputs


def evaluate_opts() -> str:
    e = config["evaluate"]
    return opts(
        weights_dir=WEIGHTS,
        n_reference=e["n_reference"],
        n_fid=e["n_fid"],
        rank_metric=e["rank_metric"],
        precision_recall=e["precision_recall"],
        batch_size=e["batch_size"],
        workers=e["workers"],
    )


def tradeoff_dir(encoder: str, layer: str) -> str:
    return f"{R}/tradeoff/{encoder}/{layer}"


def tradeoff_opts() -> str:
    t = config["tradeoff"]
    run_opts = opts(samplers=t["samplers"], steps=t["steps"], num_cond=t["num_cond"], batch_size=t["batch_size"])
    return f"{run_opts} {opts(seed=config['seed'])} {trust_flag()} {device_opt()} {t['extra_args']}"


# ---------------------------------------------------------------------------------------------- studies
STUDIES = config["studies"]


def probe_enabled() -> bool:
    return STUDIES["probe"] and config["data"]["train"]["source"] == "shapes"


def study_dir(encoder: str, layer: str, dataset: str, study: str) -> str:
    return f"{R}/studies/{encoder}/{layer}/{dataset}/{study}"


def study_opts(study: str) -> str:
    return " ".join(
        [
            opts(
                num_images=STUDIES["num_images"],
                samples=STUDIES["samples"],
                sampler=STUDIES["sampler"],
                steps=STUDIES["steps"],
                batch_size=STUDIES["batch_size"],
                seed=config["seed"],
            ),
            trust_flag(),
            device_opt(),
            STUDIES["extra_args"].get(study, ""),
        ]
    )


def study_targets() -> list[str]:
    """The settings record (written last) of every configured study of every model."""
    targets = []
    for study in STUDIES["run"]:
        if study == "trunk-head":
            pairs = [(enc, "both") for enc, spec in ENCODERS.items() if set(spec["layers"]) == set(LAYERS)]
        else:
            pairs = runs()
        sets = list(config["data"]["ood"]) if study == "ood" else ["val"]
        targets += [f"{study_dir(e, l, d, study)}/{study}.json" for e, l in pairs for d in sets]
    return targets


# ---------------------------------------------------------------------------------------------- targets
def all_targets() -> list[str]:
    """What `snakemake` builds by default: every run's samples and grids, metrics, studies, the tables."""
    targets = []
    for encoder, layer in runs():
        targets += [samples_npz(encoder, layer, dataset) for dataset in ["val", *config["data"]["ood"]]]
        targets.append(metrics_file(encoder, layer))
    if config["tradeoff"]["run"]:
        targets += [f"{tradeoff_dir(e, l)}/tradeoff.csv" for e, l in runs()]
    return targets + study_targets() + list(rules.tabulate.output)
