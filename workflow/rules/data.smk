# Images files: each dataset decoded and centre-cropped once at the model resolution. Large datasets are
# extracted in shards (data.<set>.shards or extract.shards) and merged; small ones in one job.

for _sharded in (False, True):

    rule:
        name:
            "extract_images_shard" if _sharded else "extract_images"
        output:
            temp(part_pattern(IMAGES)) if _sharded else IMAGES,
        log:
            f"{LOGS}/extract_images/{{dataset}}" + (".{shard}-of-{num}.log" if _sharded else ".log"),
        benchmark:
            f"{BENCH}/extract_images/{{dataset}}" + (".{shard}-of-{num}.tsv" if _sharded else ".tsv")
        wildcard_constraints:
            dataset=datasets_regex(_sharded),
        params:
            data=lambda wc: dataset_args(wc.dataset),
            out=lambda wc: opts(image_size=config["data"]["image_size"], images_out=IMAGES.format(**wc)),
            shard=shard_args if _sharded else "",
            run=EXTRACT_RUN,
        threads: rule_threads("extract_images")
        resources:
            **rule_resources("extract_images"),
        shell:
            "rcdm extract {params.data} {params.out} {params.shard} {params.run} > {log} 2>&1"


rule merge_images:
    input:
        lambda wc: part_files(IMAGES.format(**wc), extract_shards(wc.dataset)),
    output:
        IMAGES,
    log:
        f"{LOGS}/merge_images/{{dataset}}.log",
    benchmark:
        f"{BENCH}/merge_images/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=datasets_regex(True),
    threads: rule_threads("merge_extract")
    resources:
        **rule_resources("merge_extract"),
    shell:
        "rcdm merge-extract --out {output} --parts {input} > {log} 2>&1"
