# The paper's studies (issue 7): each writes <study>.png (shown in the report), <study>.csv (its numbers) and,
# last, <study>.json (its settings) per model, on the val images (ood: on each OOD set). trunk-head compares an
# encoder's two models: its <layer> is `both`, its first model the trunk's; it also writes trunk-head.md (the
# keep-rate table) and trunk-head_images.csv. The `hero` rule copies the first such encoder's figure and
# keep-rates to figures/hero.png and figures/keep_rates.{csv,md}, the files the README shows.
PROBE = STUDIES["probe"] and config["data"]["train"]["source"] == "shapes"  # the shapes factor probe
STUDY_OPTS = opts(**{k: STUDIES[k] for k in ("num_images", "samples", "sampler", "steps")}, seed=config["seed"])
FIRST_LAYER = {"trunk": "trunk", "head": "head", "both": "trunk"}  # the model `--checkpoint` loads
# what `snakemake` builds: the settings record, written last, of each configured study of each model
STUDY_TARGETS = [
    f"{STUDY}/{{study}}.json".format(encoder=encoder, layer=layer, dataset=dataset, study=study)
    for study in STUDIES["run"]
    for encoder, layer in (
        [(e, "both") for e, spec in ENCODERS.items() if set(spec["layers"]) == set(LAYERS)]
        if study == "trunk-head"
        else RUNS
    )
    for dataset in (config["data"]["ood"] if study == "ood" else ["val"])
]
HERO_ENCODERS = [e for e, spec in ENCODERS.items() if set(spec["layers"]) == set(LAYERS)]
HERO = f"{R}/figures"
if "trunk-head" in STUDIES["run"] and HERO_ENCODERS:
    STUDY_TARGETS.append(f"{HERO}/hero.png")


rule study_probe:
    input:
        images=IMAGES.format(dataset="train"),
        val=IMAGES.format(dataset="val"),  # its accuracy is measured on the real validation images
    output:
        probe=f"{R}/studies/probe/probe.pt",
        csv=f"{R}/studies/probe/probe.csv",
    log:
        f"{LOGS}/study/probe.log",
    benchmark:
        f"{BENCH}/study/probe.tsv"
    params:
        out=lambda wc, output: Path(output.probe).parent,
        opts=f"{opts(seed=config['seed'])} {STUDIES['extra_args'].get('probe', '')}",
    threads: rule_threads("study_probe")
    resources:
        **rule_resources("study_probe"),
        run_opts=run_opts(),
    shell:
        "rcdm study probe --images {input.images} --val-images {input.val} --out {params.out} {params.opts} "
        "{resources.run_opts} > {log} 2>&1"


rule study:
    input:
        checkpoint=lambda wc: rcdm_files(wc.encoder, FIRST_LAYER[wc.layer])["checkpoint"],
        flags=lambda wc: rcdm_files(wc.encoder, FIRST_LAYER[wc.layer])["flags"],
        encoder=lambda wc: encoder_file(wc.encoder),
        images=IMAGES,
        features=lambda wc: FEATURES.format(**{**wc, "layer": FIRST_LAYER[wc.layer]}),
        # trunk-head's second model: the head's
        head_checkpoint=lambda wc: rcdm_files(wc.encoder, "head")["checkpoint"] if wc.layer == "both" else [],
        head_flags=lambda wc: rcdm_files(wc.encoder, "head")["flags"] if wc.layer == "both" else [],
        head_features=lambda wc: (
            FEATURES.format(encoder=wc.encoder, dataset=wc.dataset, layer="head") if wc.layer == "both" else []
        ),
        probe=rules.study_probe.output.probe if PROBE else [],
        classifier=lambda wc: study_classifier(wc.study),  # adversarial: the supervised comparison
    output:
        record=f"{STUDY}/{{study}}.json",
        figure=report(
            f"{STUDY}/{{study}}.png",
            caption="../report/study.rst",
            category="Studies",
            subcategory="{study}",
            labels=lambda wc: {
                "study": wc.study,
                "encoder": wc.encoder,
                "layer": "trunk vs head" if wc.layer == "both" else wc.layer,
                "images": wc.dataset,
            },
        ),
        numbers=f"{STUDY}/{{study}}.csv",
    log:
        f"{LOGS}/study/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.log",
    benchmark:
        f"{BENCH}/study/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.tsv"
    wildcard_constraints:
        study="conditioned|ood|augment|adversarial|interpolate|manipulate|trunk-head",
        layer="trunk|head|both",
    params:
        out=lambda wc: STUDY.format(**wc),
        encoder=lambda wc: f"{encoder_args(wc.encoder)} --encoder-name {wc.encoder}",
        layer=lambda wc: opts(layer=None if wc.layer == "both" else wc.layer),
        head=lambda wc, input: opts(
            head_checkpoint=input.head_checkpoint or None,
            head_model_flags=input.head_flags or None,
            head_features=input.head_features or None,
        ),
        probe=lambda wc, input: opts(probe=input.probe or None, classifier=input.classifier or None),
        opts=lambda wc: " ".join([STUDY_OPTS, STUDIES["extra_args"].get(wc.study, "")]),
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
        run_opts=run_opts(trust="--trust-checkpoint", batch_size=STUDIES["batch_size"]),
    retries: rule_retries("study")
    shell:
        "rcdm study {wildcards.study} --checkpoint {input.checkpoint} --model-flags {input.flags} {params.head} "
        "{params.encoder} {params.layer} --images {input.images} --features {input.features} "
        "{params.probe} {params.opts} {resources.run_opts} --out {params.out} > {log} 2>&1"


localrules:
    hero,


rule hero:
    """The README's figure and table: the trunk-head study of the first encoder with both layers, copied."""
    input:
        [
            f"{STUDY}/trunk-head.{ext}".format(
                encoder=(HERO_ENCODERS or ["none"])[0], layer="both", dataset="val", study="trunk-head"
            )
            for ext in ("json", "png", "csv")  # the record, written last, vouches for trunk-head.md too
        ],
    output:
        figure=report(f"{HERO}/hero.png", caption="../report/hero.rst", category="Results"),
        numbers=f"{HERO}/keep_rates.csv",
        table=f"{HERO}/keep_rates.md",
    log:
        f"{LOGS}/hero.log",
    params:
        study=lambda wc, input: Path(input[0]).parent,
    shell:
        "(cp {params.study}/trunk-head.png {output.figure} && cp {params.study}/trunk-head.csv {output.numbers} "
        "&& cp {params.study}/trunk-head.md {output.table}) > {log} 2>&1"
