# Images files: each dataset decoded and centre-cropped once at the model resolution, in extraction jobs of
# data.<set>.shards (or extract.shards) shards each; `merge_images` joins a set's parts (one part: a hard link).


rule extract_images:
    output:
        temp(part_pattern(IMAGES)),
    log:
        f"{LOGS}/extract_images/{{dataset}}.{{shard}}-of-{{num}}.log",
    benchmark:
        f"{BENCH}/extract_images/{{dataset}}.{{shard}}-of-{{num}}.tsv"
    params:
        data=lambda wc: dataset_args(wc.dataset),
        size=opts(image_size=config["data"]["image_size"]),
        # the CLI names shard i of k>1 itself (X.h5 -> X.part-000i-of-000k.h5) and writes one shard as named
        out=lambda wc, output: opts(images_out=output[0] if int(wc.num) == 1 else IMAGES.format(**wc)),
        shard=shard_args,
        opts=EXTRACT_OPTS,
    threads: rule_threads("extract_images")
    resources:
        **rule_resources("extract_images"),
        shard_slots=1,  # grouped (SLURM profile): one shard at a time (preflight.smk)
        run_opts=run_opts(**EXTRACT_RUN),
    shell:
        "rcdm extract {params.data} {params.size} {params.out} {params.shard} {params.opts} {resources.run_opts} "
        "> {log} 2>&1"


rule merge_images:
    input:
        parts=lambda wc: [part_pattern(IMAGES).format(**wc, **job) for job in extract_jobs(wc.dataset)],
    output:
        IMAGES,
    log:
        f"{LOGS}/merge_images/{{dataset}}.log",
    benchmark:
        f"{BENCH}/merge_images/{{dataset}}.tsv"
    params:
        num=lambda wc: extract_shards(wc.dataset),
    threads: rule_threads("merge_images")
    resources:
        **rule_resources("merge_images"),
    shell:
        "if [ {params.num} -eq 1 ]; then ln -f {input.parts} {output} || cp {input.parts} {output}; "
        "else rcdm merge-extract --out {output} --parts {input.parts}; fi > {log} 2>&1"
