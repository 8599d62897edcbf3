# Features files: each encoder run once over each dataset it conditions on, all its layers in one pass
# ([N, 2, D]: image and mirror); sharded like the dataset's images, then merged and checked against the images
# file. Rules per encoder, because the number of output files (its layers) differs between encoders.

for _encoder, _spec in ENCODERS.items():
    for _sharded in (False, True):
        _outputs = {layer: FEATURES.format(encoder=_encoder, dataset="{dataset}", layer=layer) for layer in _spec["layers"]}

        rule:
            name:
                f"extract_features_{_encoder}" + ("_shard" if _sharded else "")
            input:
                images=IMAGES,
                encoder=encoder_file(_encoder),
            output:
                **({k: temp(part_pattern(v)) for k, v in _outputs.items()} if _sharded else _outputs),
            log:
                f"{LOGS}/extract_features/{_encoder}/{{dataset}}" + (".{shard}-of-{num}.log" if _sharded else ".log"),
            benchmark:
                f"{BENCH}/extract_features/{_encoder}/{{dataset}}" + (".{shard}-of-{num}.tsv" if _sharded else ".tsv")
            wildcard_constraints:
                dataset=datasets_regex(_sharded),
            params:
                data=lambda wc: dataset_args(wc.dataset),
                encoder=f"{encoder_args(_encoder)} {trust_flag('--trust-encoder')} {opts(dtype=config['extract']['feature_dtype'])}",
                out=lambda wc, _encoder=_encoder, _layers=_spec["layers"]: opts(
                    features_out=[f"{l}={FEATURES.format(encoder=_encoder, dataset=wc.dataset, layer=l)}" for l in _layers]
                ),
                shard=shard_args if _sharded else "",
                run=EXTRACT_RUN,
            threads: rule_threads("extract_features")
            resources:
                **rule_resources("extract_features"),
            shell:
                "rcdm extract {params.data} {params.encoder} {params.out} {params.shard} {params.run} > {log} 2>&1"


rule merge_features:
    input:
        parts=lambda wc: part_files(FEATURES.format(**wc), extract_shards(wc.dataset)),
        images=IMAGES,
    output:
        FEATURES,
    log:
        f"{LOGS}/merge_features/{{encoder}}/{{dataset}}.{{layer}}.log",
    benchmark:
        f"{BENCH}/merge_features/{{encoder}}/{{dataset}}.{{layer}}.tsv"
    wildcard_constraints:
        dataset=datasets_regex(True),
    threads: rule_threads("merge_extract")
    resources:
        **rule_resources("merge_extract"),
    shell:
        "rcdm merge-extract --out {output} --parts {input.parts} --images {input.images} > {log} 2>&1"
