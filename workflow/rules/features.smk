# Features files: each encoder run once over each dataset it conditions on, all its layers in one pass
# ([N, 2, D]: image and mirror), sharded, then merged and checked against the images file. One rule per
# encoder, because the number of output files (its layers) differs between encoders.

for _encoder, _spec in ENCODERS.items():
    _outputs = {
        layer: sharded(features_file(_encoder, "{dataset}", layer), EXTRACT_SHARDS) for layer in _spec["layers"]
    }

    rule:
        name:
            f"extract_features_{_encoder}"
        input:
            images=images_file("{dataset}"),
            encoder=encoder_file(_encoder),
        output:
            **({k: temp(v) for k, v in _outputs.items()} if EXTRACT_SHARDS > 1 else _outputs),
        log:
            f"{LOGS}/extract_features/{_encoder}/{{dataset}}{shard_tag(EXTRACT_SHARDS)}.log",
        benchmark:
            f"{BENCH}/extract_features/{_encoder}/{{dataset}}{shard_tag(EXTRACT_SHARDS)}.tsv"
        params:
            data=lambda wc: dataset_args(wc.dataset),
            encoder=f"{encoder_args(_encoder)} {trust_flag()} {opts(dtype=config['extract']['feature_dtype'])}",
            out=features_out(_encoder, _spec["layers"]),
            shard=lambda wc: shard_args(wc, EXTRACT_SHARDS),
            run=extract_run_opts(),
        threads: rule_threads("extract_features")
        resources:
            **rule_resources("extract_features"),
        shell:
            "rcdm extract {params.data} {params.encoder} {params.out} {params.shard} {params.run} > {log} 2>&1"


if EXTRACT_SHARDS > 1:

    rule merge_features:
        input:
            parts=lambda wc: part_files(features_file(wc.encoder, wc.dataset, wc.layer), EXTRACT_SHARDS),
            images=images_file("{dataset}"),
        output:
            features_file("{encoder}", "{dataset}", "{layer}"),
        log:
            f"{LOGS}/merge_features/{{encoder}}/{{dataset}}.{{layer}}.log",
        benchmark:
            f"{BENCH}/merge_features/{{encoder}}/{{dataset}}.{{layer}}.tsv"
        threads: rule_threads("merge_extract")
        resources:
            **rule_resources("merge_extract"),
        shell:
            "rcdm merge-extract --out {output} --parts {input.parts} --images {input.images} > {log} 2>&1"
