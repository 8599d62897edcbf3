# The paper's studies (issue 7): each writes <study>.png (shown in the report), <study>.csv (its numbers) and,
# last, <study>.json (its settings) per model, on the val images (ood: on each OOD set). trunk-head compares an
# encoder's two models: its <layer> is `both`, its first model the trunk's; it also writes trunk-head.md (the
# keep-rate table) and trunk-head_images.csv. The `hero` rule copies the first such encoder's figure and
# keep-rates to figures/hero.png and figures/keep_rates.{csv,md}, the files the README shows. Each study job
# is preceded by a local `study_check` job, the same command with `--check` (common.smk: study_command). One
# check per model for all its studies would make fewer jobs, but a change to one study's settings would then
# rerun the check and, after it, every study of that model.
# (encoder, layer, dataset, study) of each configured study job
STUDY_JOBS = [
    (encoder, layer, dataset, study)
    for study in STUDIES["run"]
    for encoder, layer in (
        [(e, "both") for e, spec in ENCODERS.items() if set(spec["layers"]) == set(LAYERS)]
        if study == "trunk-head"
        else RUNS
    )
    for dataset in (config["data"]["ood"] if study == "ood" else ["val"])
]
# what `snakemake` builds: the settings record, written last, of each configured study of each model
STUDY_TARGETS = [
    f"{STUDY}/{{study}}.json".format(encoder=e, layer=l, dataset=d, study=s) for e, l, d, s in STUDY_JOBS
]
STUDY_RUN = run_opts(trust="--trust-checkpoint", batch_size=STUDIES["batch_size"])
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


rule study_check:
    """`rcdm study <study> --check` on the head node before the study job, with its inputs and options:
    configuration and data errors (a truncated checkpoint or features file, features of another dimension,
    a missing encoder or classifier file, fewer images than asked for) fail here, once, as one line, never
    consuming a retry or a GPU allocation."""
    input:
        unpack(lambda wc: study_inputs(wc.encoder, wc.layer, wc.dataset, wc.study)),
    output:
        f"{STUDY}/study_check.txt",
    log:
        f"{LOGS}/study_check/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.log",
    wildcard_constraints:
        study="conditioned|ood|augment|adversarial|interpolate|manipulate|trunk-head",
        layer="trunk|head|both",
    params:
        cmd=lambda wc: study_command(wc.encoder, wc.layer, wc.dataset, wc.study),
    resources:
        run_opts=STUDY_RUN,
    localrule: True
    shell:
        check_shell("{params.cmd} {resources.run_opts} --check")


rule study:
    input:
        unpack(lambda wc: study_inputs(wc.encoder, wc.layer, wc.dataset, wc.study)),
        check=rules.study_check.output[0],
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
        cmd=lambda wc: study_command(wc.encoder, wc.layer, wc.dataset, wc.study),
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
        run_opts=STUDY_RUN,
    retries: rule_retries("study")
    shell:
        "{params.cmd} {resources.run_opts} > {log} 2>&1"


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
