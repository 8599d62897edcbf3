# Features files: each encoder run once over each dataset it conditions on, all its layers in one pass
# ([N, 2, D]: image and mirror), in as many jobs as the dataset's images, each writing its layers into one
# folder; `merge_features` joins one layer's parts and checks them against the images file (one part: a link).


rule extract_features:
    input:
        images=IMAGES,
        encoder=lambda wc: encoder_file(wc.encoder),
    output:
        temp(directory(FEATURE_PARTS)),
    log:
        f"{LOGS}/extract_features/{{encoder}}/{{dataset}}.{{shard}}-of-{{num}}.log",
    benchmark:
        f"{BENCH}/extract_features/{{encoder}}/{{dataset}}.{{shard}}-of-{{num}}.tsv"
    params:
        data=lambda wc: dataset_args(wc.dataset),
        encoder=lambda wc: encoder_args(wc.encoder),
        dtype=opts(dtype=config["extract"]["feature_dtype"]),
        # <folder>/<layer>.h5 for one shard, <folder>/<layer>.part-000i-of-000k.h5 (named by the CLI) for k > 1
        out=lambda wc, output: opts(
            features_out=[f"{layer}={output[0]}/{layer}.h5" for layer in ENCODERS[wc.encoder]["layers"]]
        ),
        shard=shard_args,
        opts=EXTRACT_OPTS,
    threads: rule_threads("extract_features")
    resources:
        **rule_resources("extract_features"),
        run_opts=run_opts(trust="--trust-encoder", **EXTRACT_RUN),
    retries: rule_retries("extract_features")
    shell:
        "rcdm extract {params.data} {params.encoder} {params.dtype} {params.out} {params.shard} {params.opts} "
        "{resources.run_opts} > {log} 2>&1"


rule merge_features:
    input:
        parts=lambda wc: [FEATURE_PARTS.format(**wc, **job) for job in extract_jobs(wc.dataset)],
        images=IMAGES,
    output:
        FEATURES,
    log:
        f"{LOGS}/merge_features/{{encoder}}/{{dataset}}.{{layer}}.log",
    benchmark:
        f"{BENCH}/merge_features/{{encoder}}/{{dataset}}.{{layer}}.tsv"
    params:
        num=lambda wc: extract_shards(wc.dataset),
        files=lambda wc, input: [
            shard_file(f"{folder}/{wc.layer}.h5", i, len(input.parts)) for i, folder in enumerate(input.parts)
        ],
    threads: rule_threads("merge_features")
    resources:
        **rule_resources("merge_features"),
    shell:
        "if [ {params.num} -eq 1 ]; then ln -f {params.files} {output} || cp {params.files} {output}; "
        "else rcdm merge-extract --out {output} --parts {params.files} --images {input.images}; fi > {log} 2>&1"
