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
        encoder=lambda wc: f"{encoder_args(wc.encoder, '--encoder-checkpoint')} {trust_flag('--trust-encoder')} "
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
