# The paper's studies (issue 7): each writes <study>.png (shown in the report), <study>.csv (its numbers) and,
# last, <study>.json (its settings) per model, on the val images (ood: on each OOD set).
STUDY_NAMES = "conditioned|ood|augment|adversarial|interpolate|manipulate"
TRUNK_HEAD = STUDY.format(encoder="{encoder}", layer="both", dataset="{dataset}", study="trunk-head")
PROBE = STUDIES["probe"] and config["data"]["train"]["source"] == "shapes"  # the shapes factor probe
STUDY_OPTS = " ".join(
    [
        opts(**{k: STUDIES[k] for k in ("num_images", "samples", "sampler", "steps", "batch_size")}, seed=config["seed"]),
        trust_flag(),
        device_opt(),
    ]
)


rule study_probe:
    input:
        images=IMAGES.format(dataset="train"),
    output:
        probe=f"{R}/studies/probe/probe.pt",
        csv=f"{R}/studies/probe/probe.csv",
    log:
        f"{LOGS}/study/probe.log",
    benchmark:
        f"{BENCH}/study/probe.tsv"
    params:
        out=lambda wc, output: Path(output.probe).parent,
        opts=f"{opts(seed=config['seed'])} {device_opt()} {STUDIES['extra_args'].get('probe', '')}",
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
    shell:
        "rcdm study probe --images {input.images} --out {params.out} {params.opts} > {log} 2>&1"


rule study:
    input:
        checkpoint=EMA,
        flags=f"{MODEL}/model_flags.json",
        encoder=lambda wc: encoder_file(wc.encoder),
        images=IMAGES,
        features=FEATURES,
        probe=rules.study_probe.output.probe if PROBE else [],
    output:
        record=f"{STUDY}/{{study}}.json",
        figure=report(
            f"{STUDY}/{{study}}.png",
            caption="../report/study.rst",
            category="Studies",
            subcategory="{study}",
            labels={"study": "{study}", "encoder": "{encoder}", "layer": "{layer}", "images": "{dataset}"},
        ),
        numbers=f"{STUDY}/{{study}}.csv",
    log:
        f"{LOGS}/study/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.log",
    benchmark:
        f"{BENCH}/study/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.tsv"
    wildcard_constraints:
        study=STUDY_NAMES,
    params:
        out=lambda wc: STUDY.format(**wc),
        encoder=lambda wc: encoder_args(wc.encoder),
        probe=lambda wc, input: opts(probe=input.probe or None),
        opts=lambda wc: " ".join([STUDY_OPTS, STUDIES["extra_args"].get(wc.study, "")]),
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
    shell:
        "rcdm study {wildcards.study} --checkpoint {input.checkpoint} --model-flags {input.flags} "
        "{params.encoder} --layer {wildcards.layer} --images {input.images} --features {input.features} "
        "{params.probe} {params.opts} --out {params.out} > {log} 2>&1"


rule study_trunk_head:
    input:
        checkpoint=EMA.format(encoder="{encoder}", layer="trunk"),
        flags=f"{MODEL}/model_flags.json".format(encoder="{encoder}", layer="trunk"),
        head_checkpoint=EMA.format(encoder="{encoder}", layer="head"),
        head_flags=f"{MODEL}/model_flags.json".format(encoder="{encoder}", layer="head"),
        encoder=lambda wc: encoder_file(wc.encoder),
        images=IMAGES,
        features=FEATURES.format(encoder="{encoder}", dataset="{dataset}", layer="trunk"),
        head_features=FEATURES.format(encoder="{encoder}", dataset="{dataset}", layer="head"),
        probe=rules.study_probe.output.probe if PROBE else [],
    output:
        record=f"{TRUNK_HEAD}/trunk-head.json",
        figure=report(
            f"{TRUNK_HEAD}/trunk-head.png",
            caption="../report/study.rst",
            category="Studies",
            subcategory="trunk-head",
            labels={"study": "trunk-head", "encoder": "{encoder}", "layer": "trunk vs head", "images": "{dataset}"},
        ),
        numbers=f"{TRUNK_HEAD}/trunk-head.csv",
    log:
        f"{LOGS}/study/{{encoder}}/both/{{dataset}}/trunk-head.log",
    benchmark:
        f"{BENCH}/study/{{encoder}}/both/{{dataset}}/trunk-head.tsv"
    params:
        out=lambda wc: TRUNK_HEAD.format(**wc),
        encoder=lambda wc: encoder_args(wc.encoder),
        probe=lambda wc, input: opts(probe=input.probe or None),
        opts=" ".join([STUDY_OPTS, STUDIES["extra_args"].get("trunk-head", "")]),
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
    shell:
        "rcdm study trunk-head --checkpoint {input.checkpoint} --model-flags {input.flags} "
        "--head-checkpoint {input.head_checkpoint} --head-model-flags {input.head_flags} {params.encoder} "
        "--images {input.images} --features {input.features} --head-features {input.head_features} "
        "{params.probe} {params.opts} --out {params.out} > {log} 2>&1"
