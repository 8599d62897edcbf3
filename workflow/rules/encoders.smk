# Encoders: the demo's small self-supervised encoder trained here, and (only when fetch_weights is true) the
# published weight files downloaded into weights_dir. Otherwise the workflow never downloads anything.


rule pretrain:
    input:
        images=IMAGES.format(dataset="train"),
        probe=IMAGES.format(dataset="val"),
    output:
        encoder=ENCODER,
        losses=f"{R}/encoders/{{encoder}}/encoder.csv",
    log:
        f"{LOGS}/pretrain/{{encoder}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{encoder}}.tsv"
    params:
        opts=opts(
            **{k: v for k, v in sorted(config["pretrain"].items()) if k != "extra_args"},  # any YAML order
            seed=config["seed"],
        ),
        extra=extra("pretrain"),
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
        run_opts=run_opts(),
    shell:
        "rcdm pretrain --images {input.images} --probe {input.probe} --out {output.encoder} "
        "--log {output.losses} {params.opts} {params.extra} {resources.run_opts} > {log} 2>&1"


# Always defined, so `--until fetch` / `--forcerun fetch` work; without fetch_weights it matches no file.
rule fetch:
    output:
        f"{WEIGHTS}/{{filename}}",
    log:
        f"{LOGS}/fetch/{{filename}}.log",
    params:
        weights_dir=lambda wc, output: Path(output[0]).parent,
    localrule: True
    wildcard_constraints:
        filename=r"[^/]+\.(pth|pt|torch)" if config["fetch_weights"] else "(?!x)x",
    threads: rule_threads("fetch")
    resources:
        **rule_resources("fetch"),
    shell:
        "rcdm fetch --weights-dir {params.weights_dir} {wildcards.filename} > {log} 2>&1"
