# Images files: each dataset decoded and centre-cropped once at the model resolution, sharded, then merged.
_images_shard = sharded(images_file("{dataset}"), EXTRACT_SHARDS)


rule extract_images:
    output:
        temp(_images_shard) if EXTRACT_SHARDS > 1 else _images_shard,
    log:
        f"{LOGS}/extract_images/{{dataset}}{shard_tag(EXTRACT_SHARDS)}.log",
    benchmark:
        f"{BENCH}/extract_images/{{dataset}}{shard_tag(EXTRACT_SHARDS)}.tsv"
    params:
        data=lambda wc: dataset_args(wc.dataset),
        out=lambda wc: opts(image_size=config["data"]["image_size"], images_out=images_file(wc.dataset)),
        shard=lambda wc: shard_args(wc, EXTRACT_SHARDS),
        run=extract_run_opts(),
    threads: rule_threads("extract_images")
    resources:
        **rule_resources("extract_images"),
    shell:
        "rcdm extract {params.data} {params.out} {params.shard} {params.run} > {log} 2>&1"


if EXTRACT_SHARDS > 1:

    rule merge_images:
        input:
            lambda wc: part_files(images_file(wc.dataset), EXTRACT_SHARDS),
        output:
            images_file("{dataset}"),
        log:
            f"{LOGS}/merge_images/{{dataset}}.log",
        benchmark:
            f"{BENCH}/merge_images/{{dataset}}.tsv"
        threads: rule_threads("merge_extract")
        resources:
            **rule_resources("merge_extract"),
        shell:
            "rcdm merge-extract --out {output} --parts {input} > {log} 2>&1"
