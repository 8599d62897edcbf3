# Features files: each encoder run once over each dataset it conditions on, all its layers in one pass
# ([N, 2, D]: image and mirror), in as many jobs as the dataset's images, each writing its layers into one
# folder; `merge_features` joins one layer's parts and checks them against the images file (one part: a link).


# What `rcdm extract` reads and how it is called for features: shared by the check below and the extraction
# jobs, so the check sees exactly the data, encoder and options its shards will (the number of shards, not the
# shard; the features files named, not written)
FEATURES_INPUT = dict(
    images=IMAGES,
    encoder=lambda wc: encoder_file(wc.encoder),
)
FEATURES_PARAMS = dict(
    data=lambda wc: dataset_args(wc.dataset),
    encoder=lambda wc: encoder_args(wc.encoder),
    dtype=opts(dtype=config["extract"]["feature_dtype"]),
    opts=EXTRACT_OPTS,
)
FEATURES_RUN = run_opts(trust="--trust-encoder", **EXTRACT_RUN)
FEATURES_ARGS = "{params.data} {params.encoder} {params.dtype} {params.out} {params.shard} {params.opts}"
FEATURES_ARGS += " {resources.run_opts}"


rule extract_features_check:
    """`rcdm extract --check` on the head node, once per encoder and dataset, before any of its extraction
    shards: configuration and data errors (a missing, truncated or foreign encoder weights file, an encoder
    without a requested layer, an image folder that is gone) fail here, once, as one line, never consuming a
    retry or a GPU allocation."""
    input:
        **FEATURES_INPUT,
    output:
        f"{R}/features/{{encoder}}/{{dataset}}/extract_features_check.txt",
    log:
        f"{LOGS}/extract_features_check/{{encoder}}/{{dataset}}.log",
    params:
        **FEATURES_PARAMS,
        out=lambda wc, output: features_out(str(Path(output[0]).parent), wc.encoder),
        shard=lambda wc: opts(num_shards=extract_shards(wc.dataset)),
    resources:
        run_opts=FEATURES_RUN,
    localrule: True
    shell:
        check_shell(f"rcdm extract --check {FEATURES_ARGS}")


rule extract_features:
    input:
        **FEATURES_INPUT,
        check=rules.extract_features_check.output[0],
    output:
        temp(directory(FEATURE_PARTS)),
    log:
        f"{LOGS}/extract_features/{{encoder}}/{{dataset}}.{{shard}}-of-{{num}}.log",
    benchmark:
        f"{BENCH}/extract_features/{{encoder}}/{{dataset}}.{{shard}}-of-{{num}}.tsv"
    params:
        **FEATURES_PARAMS,
        out=lambda wc, output: features_out(output[0], wc.encoder),
        shard=shard_args,
    threads: rule_threads("extract_features")
    resources:
        **rule_resources("extract_features"),
        shard_slots=1,  # grouped (SLURM profile): one shard at a time (preflight.smk)
        run_opts=FEATURES_RUN,
    retries: rule_retries("extract_features")
    shell:
        f"rcdm extract {FEATURES_ARGS} > {{log}} 2>&1"


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
