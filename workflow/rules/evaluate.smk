# Metrics of each run's validation samples: FID/IS (when the Inception file is in weights_dir), FD_rep in the
# conditioning encoder's space, rank and MRR of the true conditioning: one metrics.csv row per run.


# What `rcdm evaluate` reads and how it is called: shared by the check below and the evaluation job
EVALUATE_INPUT = dict(
    samples=f"{SAMPLES}/samples.npz".format(encoder="{encoder}", layer="{layer}", dataset="val"),
    features=FEATURES.format(encoder="{encoder}", dataset="val", layer="{layer}"),
    encoder=lambda wc: encoder_file(wc.encoder),
    reference=IMAGES.format(dataset="val"),
    inception=weight_file("inception") if config["evaluate"]["require_fid"] else [],
)
EVALUATE_PARAMS = dict(
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
    out=lambda wc: METRICS.format(**wc),
)
EVALUATE_RUN = run_opts(
    trust="--trust-encoder", batch_size=config["evaluate"]["batch_size"], workers=config["evaluate"]["workers"]
)
# `--out {params.out}`: the metrics file (the check writes none)
EVALUATE_ARGS = (
    "--samples {input.samples} --out {params.out} {params.run} "
    "--reference-images {input.reference} --features {input.features} {params.encoder} {params.opts} "
    "{params.extra} {resources.run_opts}"
)


rule evaluate_check:
    """`rcdm evaluate --check` on the head node before the evaluation job: configuration and data errors (a
    truncated samples or features file, a broken encoder or Inception weights file) fail here, once, as one
    line, never consuming a retry or a GPU allocation."""
    input:
        **EVALUATE_INPUT,
    output:
        f"{R}/metrics/{{encoder}}/{{layer}}/evaluate_check.txt",
    log:
        f"{LOGS}/evaluate_check/{{encoder}}/{{layer}}.log",
    params:
        **EVALUATE_PARAMS,
    resources:
        run_opts=EVALUATE_RUN,
    localrule: True
    shell:
        check_shell(f"rcdm evaluate --check {EVALUATE_ARGS}")


rule evaluate:
    input:
        **EVALUATE_INPUT,
        check=rules.evaluate_check.output[0],
    output:
        METRICS,
    log:
        f"{LOGS}/evaluate/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{encoder}}/{{layer}}.tsv"
    params:
        **EVALUATE_PARAMS,
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
        run_opts=EVALUATE_RUN,
    retries: rule_retries("evaluate")
    shell:
        f"rcdm evaluate {EVALUATE_ARGS} > {{log}} 2>&1"


# What `rcdm tradeoff` reads and how it is called: shared by the check below and the tradeoff job
TRADEOFF_INPUT = dict(
    # a dict literal: `checkpoint` opening a line is a Snakemake keyword
    **{"checkpoint": lambda wc: rcdm_files(wc.encoder, wc.layer)["checkpoint"]},
    flags=lambda wc: rcdm_files(wc.encoder, wc.layer)["flags"],
    features=FEATURES.format(encoder="{encoder}", dataset="val", layer="{layer}"),
    images=IMAGES.format(dataset="val"),
    encoder=lambda wc: encoder_file(wc.encoder),
)
TRADEOFF_PARAMS = dict(
    out=lambda wc: TRADEOFF.format(**wc),
    encoder=lambda wc: encoder_args(wc.encoder),
    opts=opts(**{k: config["tradeoff"][k] for k in ("samplers", "steps", "num_cond")}, seed=config["seed"]),
    extra=extra("tradeoff"),
)
TRADEOFF_RUN = run_opts(trust="--trust-checkpoint", batch_size=config["tradeoff"]["batch_size"])
TRADEOFF_ARGS = (
    "--checkpoint {input.checkpoint} --flags {input.flags} --features {input.features} "
    "--images {input.images} {params.encoder} --layer {wildcards.layer} {params.opts} {params.extra} "
    "{resources.run_opts} --out {params.out}"
)


rule tradeoff_check:
    """`rcdm tradeoff --check` on the head node before the tradeoff job: configuration and data errors (a
    truncated checkpoint or features file, features of another dimension, fewer conditionings than
    `tradeoff.num_cond`) fail here, once, as one line, never consuming a retry or a GPU allocation."""
    input:
        **TRADEOFF_INPUT,
    output:
        f"{TRADEOFF}/tradeoff_check.txt",
    log:
        f"{LOGS}/tradeoff_check/{{encoder}}/{{layer}}.log",
    params:
        **TRADEOFF_PARAMS,
    resources:
        run_opts=TRADEOFF_RUN,
    localrule: True
    shell:
        check_shell(f"rcdm tradeoff --check {TRADEOFF_ARGS}")


rule tradeoff:
    """Sampler speed versus quality on a subset of val: FD_rep and MRR against the number of UNet evaluations."""
    input:
        **TRADEOFF_INPUT,
        check=rules.tradeoff_check.output[0],
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
        **TRADEOFF_PARAMS,
    threads: rule_threads("tradeoff")
    resources:
        **rule_resources("tradeoff"),
        run_opts=TRADEOFF_RUN,
    retries: rule_retries("tradeoff")
    shell:
        f"rcdm tradeoff {TRADEOFF_ARGS} > {{log}} 2>&1"
