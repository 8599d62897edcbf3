# Metrics of each run's validation samples: FID/IS (when the Inception file is in weights_dir), FD_rep in the
# conditioning encoder's space, rank and MRR of the true conditioning: one metrics.csv row per run.


rule evaluate:
    input:
        samples=f"{SAMPLES}/samples.npz".format(encoder="{encoder}", layer="{layer}", dataset="val"),
        features=FEATURES.format(encoder="{encoder}", dataset="val", layer="{layer}"),
        encoder=lambda wc: encoder_file(wc.encoder),
        reference=IMAGES.format(dataset="val"),
        inception=weight_file("inception") if config["evaluate"]["require_fid"] else [],
    output:
        METRICS,
    log:
        f"{LOGS}/evaluate/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{encoder}}/{{layer}}.tsv"
    params:
        run=lambda wc: opts(
            run_id=f"{wc.encoder}-{wc.layer}-{config['sample']['sampler']}{config['sample']['steps']}",
            encoder_name=wc.encoder,
            dataset=f"{config['experiment']}:val",
        ),
        encoder=lambda wc: f"{encoder_args(wc.encoder)} --layer {wc.layer}",
        opts=opts(
            weights_dir=WEIGHTS,
            **{k: config["evaluate"][k] for k in ("n_reference", "n_fid", "rank_metric", "precision_recall")},
        ),
        extra=extra("evaluate"),
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
        run_opts=run_opts(
            trust="--trust-encoder", batch_size=config["evaluate"]["batch_size"], workers=config["evaluate"]["workers"]
        ),
    retries: rule_retries("evaluate")
    shell:
        "rcdm evaluate --samples {input.samples} --out {output} {params.run} "
        "--reference-images {input.reference} --features {input.features} {params.encoder} {params.opts} "
        "{params.extra} {resources.run_opts} > {log} 2>&1"

rule tradeoff:
    """Sampler speed versus quality on a subset of val: FD_rep and MRR against the number of UNet evaluations."""
    input:
        checkpoint=lambda wc: rcdm_files(wc.encoder, wc.layer)["checkpoint"],
        flags=lambda wc: rcdm_files(wc.encoder, wc.layer)["flags"],
        features=FEATURES.format(encoder="{encoder}", dataset="val", layer="{layer}"),
        images=IMAGES.format(dataset="val"),
        encoder=lambda wc: encoder_file(wc.encoder),
    output:
        table=f"{TRADEOFF}/tradeoff.csv",
        plot=report(
            f"{TRADEOFF}/tradeoff.png",
            caption="../report/tradeoff.rst",
            category="Speed versus quality",
            labels={"encoder": "{encoder}", "layer": "{layer}"},
        ),
        pick=f"{TRADEOFF}/recommended.json",
    log:
        f"{LOGS}/tradeoff/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/tradeoff/{{encoder}}/{{layer}}.tsv"
    params:
        out=lambda wc, output: Path(output.table).parent,
        encoder=lambda wc: encoder_args(wc.encoder),
        opts=opts(**{k: config["tradeoff"][k] for k in ("samplers", "steps", "num_cond")}, seed=config["seed"]),
        extra=extra("tradeoff"),
    threads: rule_threads("tradeoff")
    resources:
        **rule_resources("tradeoff"),
        run_opts=run_opts(trust="--trust-checkpoint", batch_size=config["tradeoff"]["batch_size"]),
    retries: rule_retries("tradeoff")
    shell:
        "rcdm tradeoff --checkpoint {input.checkpoint} --flags {input.flags} --features {input.features} "
        "--images {input.images} {params.encoder} --layer {wildcards.layer} {params.opts} {params.extra} "
        "{resources.run_opts} --out {params.out} > {log} 2>&1"
