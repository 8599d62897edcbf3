# Samples conditioned on the representations of a dataset's images (val for the metrics, the OOD sets for their
# grids), sharded over conditionings, then merged into samples.npz (ADM evaluation format) and a PNG grid.

# (conditionings, samples each) and sampling jobs per dataset: val has the metrics' settings, sample.shards
# jobs; the OOD sets the grids' settings, one job each
SAMPLE_COUNTS = dict.fromkeys(config["data"]["ood"], (config["ood"]["num_images"], config["ood"]["samples_per_image"]))
SAMPLE_COUNTS["val"] = (config["sample"]["num_conditionings"], config["sample"]["samples_per_image"])
SAMPLE_SHARDS = {name: 1 for name in config["data"]["ood"]} | {"val": config["sample"]["shards"]}


# What `rcdm sample` reads and how it is called: shared by the check below and the sampling jobs, so the check
# sees exactly the inputs and options its shards will (the number of shards, not the shard)
SAMPLE_INPUT = dict(
    # trained here or a published/given file: rcdm_files (common.smk)
    # a dict literal: `checkpoint` opening a line is a Snakemake keyword
    **{"checkpoint": lambda wc: rcdm_files(wc.encoder, wc.layer)["checkpoint"]},
    flags=lambda wc: rcdm_files(wc.encoder, wc.layer)["flags"],
    features=FEATURES,
)
SAMPLE_PARAMS = dict(
    out=lambda wc: opts(out=f"{SAMPLES}/samples.h5".format(**wc)),
    opts=lambda wc: opts(
        num_images=SAMPLE_COUNTS[wc.dataset][0],
        subset_seed=config["seed"],
        samples_per_image=SAMPLE_COUNTS[wc.dataset][1],
        **{k: config["sample"][k] for k in ("sampler", "steps", "eta")},
        no_clip=not config["sample"]["clip_denoised"],
        seed=config["seed"],
        precision=config["sample"]["precision"],
    ),
    extra=extra("sample"),
)
# the noise is drawn per (seed, conditioning, sample): the samples do not depend on the batch size
SAMPLE_RUN = run_opts(trust="--trust-checkpoint", batch_size=config["sample"]["batch_size"])
SAMPLE_ARGS = (
    "--checkpoint {input.checkpoint} --model-flags {input.flags} --features {input.features} "
    "{params.opts} {params.out} {params.shard} {params.extra} {resources.run_opts}"
)


rule sample_check:
    """`rcdm sample --check` on the head node, once per model and conditioning set, before any of its sampling
    shards: configuration and data errors (a truncated checkpoint or features file, features of another
    dimension than the model's, fewer conditionings than asked for) fail here, once, as one line, never
    consuming a retry or a GPU allocation."""
    input:
        **SAMPLE_INPUT,
    output:
        f"{SAMPLES}/sample_check.txt",
    log:
        f"{LOGS}/sample_check/{{encoder}}/{{layer}}/{{dataset}}.log",
    params:
        **SAMPLE_PARAMS,
        shard=lambda wc: opts(num_shards=SAMPLE_SHARDS[wc.dataset]),
    resources:
        run_opts=SAMPLE_RUN,
    localrule: True
    shell:
        check_shell(f"rcdm sample --check {SAMPLE_ARGS}")


rule sample:
    input:
        **SAMPLE_INPUT,
        check=rules.sample_check.output[0],
    output:
        part_pattern(f"{SAMPLES}/samples.h5"),
    log:
        f"{LOGS}/sample/{{encoder}}/{{layer}}/{{dataset}}.{{shard}}-of-{{num}}.log",
    benchmark:
        f"{BENCH}/sample/{{encoder}}/{{layer}}/{{dataset}}.{{shard}}-of-{{num}}.tsv"
    params:
        **SAMPLE_PARAMS,
        shard=shard_args,
    threads: rule_threads("sample")
    resources:
        **rule_resources("sample"),
        shard_slots=1,  # grouped (SLURM profile): one shard at a time (preflight.smk)
        run_opts=SAMPLE_RUN,
    retries: rule_retries("sample")
    shell:
        f"rcdm sample {SAMPLE_ARGS} > {{log}} 2>&1"


rule merge_samples:
    input:
        shards=lambda wc: part_files(f"{SAMPLES}/samples.h5".format(**wc), SAMPLE_SHARDS[wc.dataset]),
        images=IMAGES,
    output:
        npz=f"{SAMPLES}/samples.npz",
        grid=report(
            f"{SAMPLES}/grid.png",
            caption="../report/grid.rst",
            category="Samples",
            subcategory="{dataset}",
            labels={"encoder": "{encoder}", "layer": "{layer}", "conditioned on": "{dataset}"},
        ),
    log:
        f"{LOGS}/merge_samples/{{encoder}}/{{layer}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/merge_samples/{{encoder}}/{{layer}}/{{dataset}}.tsv"
    params:
        input=lambda wc: opts(input=f"{SAMPLES}/samples.h5".format(**wc), num_shards=SAMPLE_SHARDS[wc.dataset]),
        grid=lambda wc: opts(
            grid_rows=config["sample"]["grid_images"], grid_cols=min(8, SAMPLE_COUNTS[wc.dataset][1])
        ),
    threads: rule_threads("merge_samples")
    resources:
        **rule_resources("merge_samples"),
    shell:
        "rcdm merge-samples {params.input} --out {output.npz} --grid {output.grid} {params.grid} "
        "--images {input.images} > {log} 2>&1"
