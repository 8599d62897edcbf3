# Samples conditioned on the representations of a dataset's images (val for the metrics, the OOD sets for their
# grids), sharded over conditionings, then merged into samples.npz (ADM evaluation format) and a PNG grid.


rule sample:
    input:
        checkpoint=ema_file("{encoder}", "{layer}"),
        flags=rules.run_flags.output[0],
        features=features_file("{encoder}", "{dataset}", "{layer}"),
    output:
        part_pattern(samples_h5("{encoder}", "{layer}", "{dataset}")),
    log:
        f"{LOGS}/sample/{{encoder}}/{{layer}}/{{dataset}}.{{shard}}-of-{{num}}.log",
    benchmark:
        f"{BENCH}/sample/{{encoder}}/{{layer}}/{{dataset}}.{{shard}}-of-{{num}}.tsv"
    params:
        out=lambda wc: opts(out=samples_h5(wc.encoder, wc.layer, wc.dataset)),
        shard=shard_args,
        opts=lambda wc: sample_opts(wc.dataset),
        trust=trust_flag(),
        device=device_opt(),
        extra=extra("sample"),
    threads: rule_threads("sample")
    resources:
        **rule_resources("sample"),
    shell:
        "rcdm sample --checkpoint {input.checkpoint} --model-flags {input.flags} {params.trust} "
        "--features {input.features} {params.opts} {params.device} {params.out} {params.shard} {params.extra} "
        "> {log} 2>&1"


rule merge_samples:
    input:
        shards=lambda wc: part_files(samples_h5(wc.encoder, wc.layer, wc.dataset), sample_shards(wc.dataset)),
        images=images_file("{dataset}"),
    output:
        npz=samples_npz("{encoder}", "{layer}", "{dataset}"),
        grid=report(
            f"{R}/samples/{{encoder}}/{{layer}}/{{dataset}}/grid.png",
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
        input=lambda wc: opts(
            input=samples_h5(wc.encoder, wc.layer, wc.dataset), num_shards=sample_shards(wc.dataset)
        ),
        grid=lambda wc: opts(grid_rows=config["sample"]["grid_images"], grid_cols=min(8, sample_counts(wc.dataset)[1])),
    threads: rule_threads("merge_samples")
    resources:
        **rule_resources("merge_samples"),
    shell:
        "rcdm merge-samples {params.input} --out {output.npz} --grid {output.grid} {params.grid} "
        "--images {input.images} > {log} 2>&1"
