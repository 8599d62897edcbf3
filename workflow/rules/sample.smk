# Samples conditioned on the representations of a dataset's images (val for the metrics, the OOD sets for their
# grids), sharded over conditionings, then merged into samples.npz (ADM evaluation format) and a PNG grid.

# (conditionings, samples each) and sampling jobs per dataset: val has the metrics' settings, sample.shards
# jobs; the OOD sets the grids' settings, one job each
SAMPLE_COUNTS = dict.fromkeys(config["data"]["ood"], (config["ood"]["num_images"], config["ood"]["samples_per_image"]))
SAMPLE_COUNTS["val"] = (config["sample"]["num_conditionings"], config["sample"]["samples_per_image"])
SAMPLE_SHARDS = {name: 1 for name in config["data"]["ood"]} | {"val": config["sample"]["shards"]}


rule sample:
    input:
        # trained here or a published/given file: rcdm_files (common.smk)
        checkpoint=lambda wc: rcdm_files(wc.encoder, wc.layer)["checkpoint"],
        flags=lambda wc: rcdm_files(wc.encoder, wc.layer)["flags"],
        features=FEATURES,
    output:
        part_pattern(f"{SAMPLES}/samples.h5"),
    log:
        f"{LOGS}/sample/{{encoder}}/{{layer}}/{{dataset}}.{{shard}}-of-{{num}}.log",
    benchmark:
        f"{BENCH}/sample/{{encoder}}/{{layer}}/{{dataset}}.{{shard}}-of-{{num}}.tsv"
    params:
        out=lambda wc: opts(out=f"{SAMPLES}/samples.h5".format(**wc)),
        shard=shard_args,
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
    threads: rule_threads("sample")
    resources:
        **rule_resources("sample"),
        # the noise is drawn per (seed, conditioning, sample): the samples do not depend on the batch size
        run_opts=run_opts(trust="--trust-checkpoint", batch_size=config["sample"]["batch_size"]),
    retries: rule_retries("sample")
    shell:
        "rcdm sample --checkpoint {input.checkpoint} --model-flags {input.flags} --features {input.features} "
        "{params.opts} {params.out} {params.shard} {params.extra} {resources.run_opts} > {log} 2>&1"

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
