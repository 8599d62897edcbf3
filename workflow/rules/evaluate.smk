# Metrics of each run's validation samples: FID/IS (when the Inception file is in weights_dir), FD_rep in the
# conditioning encoder's space, rank and MRR of the true conditioning: one metrics.csv row per run.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics_file("{encoder}", "{layer}"),
    log:
        f"{LOGS}/evaluate/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{encoder}}/{{layer}}.tsv"
    params:
        run=lambda wc: opts(
            run_id=f"{wc.encoder}-{wc.layer}-{config['sample']['sampler']}{config['sample']['steps']}",
            dataset=f"{config['experiment']}:val",
        ),
        encoder=lambda wc: f"{encoder_args(wc.encoder)} {trust_flag('--trust-encoder')} "
        f"--layer {wc.layer}",
        opts=evaluate_opts(),
        device=device_opt(),
        extra=extra("evaluate"),
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    shell:
        "rcdm evaluate --samples {input.samples} --out {output} {params.run} --reference-images {input.reference} "
        "--features {input.features} {params.encoder} {params.opts} {params.device} {params.extra} > {log} 2>&1"


rule tradeoff:
    """Sampler speed versus quality on a subset of val: FD_rep and MRR against the number of UNet evaluations."""
    input:
        checkpoint=ema_file("{encoder}", "{layer}"),
        flags=f"{model_dir('{encoder}', '{layer}')}/model_flags.json",
        features=features_file("{encoder}", "val", "{layer}"),
        images=images_file("val"),
        encoder=lambda wc: encoder_file(wc.encoder),
    output:
        table=f"{tradeoff_dir('{encoder}', '{layer}')}/tradeoff.csv",
        plot=report(
            f"{tradeoff_dir('{encoder}', '{layer}')}/tradeoff.png",
            caption="../report/tradeoff.rst",
            category="Speed versus quality",
            labels={"encoder": "{encoder}", "layer": "{layer}"},
        ),
        pick=f"{tradeoff_dir('{encoder}', '{layer}')}/recommended.json",
    log:
        f"{LOGS}/tradeoff/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/tradeoff/{{encoder}}/{{layer}}.tsv"
    params:
        out=lambda wc, output: Path(output.table).parent,
        encoder=lambda wc: encoder_args(wc.encoder),
        opts=tradeoff_opts(),
    threads: rule_threads("tradeoff")
    resources:
        **rule_resources("tradeoff"),
    shell:
        "rcdm tradeoff --checkpoint {input.checkpoint} --flags {input.flags} --features {input.features} "
        "--images {input.images} {params.encoder} --layer {wildcards.layer} {params.opts} --out {params.out} "
        "> {log} 2>&1"
