# Checks of the configuration against the data it names, run while the DAG is built (`snakemake -n` included),
# before any job: image folders exist and hold images, and no count asks for more than exists (conditionings,
# OOD images, sampling and extraction shards, one training batch). Each error names the config key and the fix.
# Runs in the main Snakemake process only (not in cluster jobs, nor for --lint): counting a folder of 1.28M
# files takes a few seconds. Counts use the stage CLIs' own rules (rcdm.data: extensions, shapes' split sizes,
# the bundled photos); a folder's count is an upper bound when on_bad_image: skip drops unreadable files.
import sys


def dataset_key(name: str) -> str:
    """The config key of a dataset of DATASETS: data.train, data.val or data.ood.<name>."""
    return f"data.{name}" if name in ("train", "val") else f"data.ood.{name}"


def dataset_size(name: str) -> int:
    """The number of images a dataset of the configuration gives; a WorkflowError when it cannot be built."""
    from rcdm.data import IMAGE_EXTENSIONS, PHOTO_NAMES, FolderSource
    from rcdm.shapes import DEFAULT_SPLIT_SIZES

    spec, key = DATASETS[name], dataset_key(name)
    wanted = spec.get("num_images")
    if spec["source"] == "shapes":
        return wanted or DEFAULT_SPLIT_SIZES.get(spec["split"] or name, DEFAULT_SPLIT_SIZES["val"])
    if spec["source"] == "photos":
        available, what = len(PHOTO_NAMES), "the photos source has"
    else:
        path = Path(spec["path"])
        if not path.is_dir():
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise WorkflowError(
                f"{key}.path: image folder {str(path)!r}{where} does not exist; point it at a folder of images."
            )
        available, what = len(FolderSource(path)), f"folder {str(path)!r} holds"
        if not available:
            raise WorkflowError(
                f"{key}.path: folder {str(path)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}, any "
                "case, in it or its subfolders); point it at a folder of images."
            )
    if wanted and wanted > available:
        raise WorkflowError(
            f"{key}.num_images: {wanted} but {what} {available} images; lower it, or null for all of them."
        )
    return wanted or available


def preflight_checks() -> None:
    """Every check of the configuration that needs only the configuration and the image folders."""
    # The train set is read only to train an RCDM or pretrain an encoder (config/published.yaml does neither).
    trains = any(rcdm_choice(e, layer) == "train" for e, layer in RUNS)
    trains = trains or any(enc["source"] == "pretrain" for enc in ENCODERS.values())
    sizes = {name: dataset_size(name) for name in DATASETS if trains or name != "train"}
    for name, n in sizes.items():
        if extract_shards(name) > n:
            raise WorkflowError(
                f"{dataset_key(name)}.shards (or extract.shards): {extract_shards(name)} extraction jobs for "
                f"{n} images; lower it to at most {n}."
            )
    batch = config["train"]["batch_size"]
    if trains and sizes["train"] < batch:
        raise WorkflowError(
            f"train.batch_size: {batch} but data.train has {sizes['train']} images, fewer than one batch; lower "
            "train.batch_size or train on more images (data.train.num_images)."
        )
    conditionings = config["sample"]["num_conditionings"]
    if conditionings and conditionings > sizes["val"]:
        raise WorkflowError(
            f"sample.num_conditionings: {conditionings} but data.val has {sizes['val']} images; lower it, or "
            "null for all of them."
        )
    shards = config["sample"]["shards"]
    if shards > (conditionings or sizes["val"]):
        raise WorkflowError(
            f"sample.shards: {shards} sampling jobs for {conditionings or sizes['val']} conditionings; lower "
            f"sample.shards to at most {conditionings or sizes['val']}."
        )
    tradeoff = config["tradeoff"]
    if tradeoff["run"] and tradeoff["num_cond"] > sizes["val"]:
        raise WorkflowError(
            f"tradeoff.num_cond: {tradeoff['num_cond']} but data.val has {sizes['val']} images; lower "
            f"tradeoff.num_cond to at most {sizes['val']}."
        )
    ood = config["ood"]["num_images"]
    for name in config["data"]["ood"]:
        if ood and ood > sizes[name]:
            raise WorkflowError(
                f"ood.num_images: {ood} but {dataset_key(name)} has {sizes[name]} images; lower ood.num_images, "
                f"or null for all of them."
            )


def grouping_checks() -> None:
    """Grouped shard jobs (slurm/config.yaml groups them) must ask for one shard's GPU, CPUs and memory and run
    their shards one after another: the shard rules take one `shard_slots` each, and a group may hold one
    (`--resources shard_slots=1`, local scope). Without that limit Snakemake asks for the sum over the group's
    shards (8 one-GPU shards: --gpus=8, 7 of them idle while the shards run one at a time); a command line's
    --resources or --set-resource-scopes replaces the profile's whole list, dropping it silently. Called by the
    Snakefile's onstart: the groups are known only once the run starts (not for a dry run)."""
    grouped = sorted(set(workflow.group_settings.overwrite_groups) & {"extract_images", "extract_features", "sample"})
    slots = getattr(workflow.resource_settings.resources.get("shard_slots"), "value", None)
    scope = workflow.resource_settings.overwrite_resource_scopes.get("shard_slots")
    if grouped and (slots != 1 or scope != "local"):
        raise WorkflowError(
            f"--groups puts the shard jobs of {', '.join(grouped)} in groups, but shard_slots is {slots} "
            f"({scope or 'global'} scope): each group would ask for the GPUs, CPUs and memory of all its shards "
            "and use one shard's. Add shard_slots=1 to --resources and shard_slots=local to "
            "--set-resource-scopes (slurm/config.yaml has both; a command line's list replaces the profile's)."
        )


# --lint reads the workflow only (the configuration's folders may live on a cluster): no way to tell it from a run
# at this point but the command line
if workflow.is_main_process and "--lint" not in sys.argv:
    preflight_checks()
