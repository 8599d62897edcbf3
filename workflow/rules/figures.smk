# The paper's studies (issue 7): each writes <study>.png (shown in the report), <study>.csv (its numbers) and,
# last, <study>.json (its settings) per model, on the val images (ood: on each OOD set).
STUDY_NAMES = "conditioned|ood|augment|adversarial|interpolate|manipulate"


rule study_probe:
    input:
        images=images_file("train"),
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
        checkpoint=ema_file("{encoder}", "{layer}"),
        flags=f"{model_dir('{encoder}', '{layer}')}/model_flags.json",
        encoder=lambda wc: encoder_file(wc.encoder),
        images=images_file("{dataset}"),
        features=features_file("{encoder}", "{dataset}", "{layer}"),
        probe=rules.study_probe.output.probe if probe_enabled() else [],
    output:
        record=f"{study_dir('{encoder}', '{layer}', '{dataset}', '{study}')}/{{study}}.json",
        figure=report(
            f"{study_dir('{encoder}', '{layer}', '{dataset}', '{study}')}/{{study}}.png",
            caption="../report/study.rst",
            category="Studies",
            subcategory="{study}",
            labels={"study": "{study}", "encoder": "{encoder}", "layer": "{layer}", "images": "{dataset}"},
        ),
        numbers=f"{study_dir('{encoder}', '{layer}', '{dataset}', '{study}')}/{{study}}.csv",
    log:
        f"{LOGS}/study/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.log",
    benchmark:
        f"{BENCH}/study/{{encoder}}/{{layer}}/{{dataset}}/{{study}}.tsv"
    wildcard_constraints:
        study=STUDY_NAMES,
    params:
        out=lambda wc: study_dir(wc.encoder, wc.layer, wc.dataset, wc.study),
        encoder=lambda wc: encoder_args(wc.encoder),
        probe=lambda wc, input: opts(probe=input.probe or None),
        opts=lambda wc: study_opts(wc.study),
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
    shell:
        "rcdm study {wildcards.study} --checkpoint {input.checkpoint} --model-flags {input.flags} "
        "{params.encoder} --layer {wildcards.layer} --images {input.images} --features {input.features} "
        "{params.probe} {params.opts} --out {params.out} > {log} 2>&1"


rule study_trunk_head:
    input:
        checkpoint=ema_file("{encoder}", "trunk"),
        flags=f"{model_dir('{encoder}', 'trunk')}/model_flags.json",
        head_checkpoint=ema_file("{encoder}", "head"),
        head_flags=f"{model_dir('{encoder}', 'head')}/model_flags.json",
        encoder=lambda wc: encoder_file(wc.encoder),
        images=images_file("{dataset}"),
        features=features_file("{encoder}", "{dataset}", "trunk"),
        head_features=features_file("{encoder}", "{dataset}", "head"),
        probe=rules.study_probe.output.probe if probe_enabled() else [],
    output:
        record=f"{study_dir('{encoder}', 'both', '{dataset}', 'trunk-head')}/trunk-head.json",
        figure=report(
            f"{study_dir('{encoder}', 'both', '{dataset}', 'trunk-head')}/trunk-head.png",
            caption="../report/study.rst",
            category="Studies",
            subcategory="trunk-head",
            labels={"study": "trunk-head", "encoder": "{encoder}", "layer": "trunk vs head", "images": "{dataset}"},
        ),
        numbers=f"{study_dir('{encoder}', 'both', '{dataset}', 'trunk-head')}/trunk-head.csv",
    log:
        f"{LOGS}/study/{{encoder}}/both/{{dataset}}/trunk-head.log",
    benchmark:
        f"{BENCH}/study/{{encoder}}/both/{{dataset}}/trunk-head.tsv"
    params:
        out=lambda wc: study_dir(wc.encoder, "both", wc.dataset, "trunk-head"),
        encoder=lambda wc: encoder_args(wc.encoder),
        probe=lambda wc, input: opts(probe=input.probe or None),
        opts=study_opts("trunk-head"),
    threads: rule_threads("study")
    resources:
        **rule_resources("study"),
    shell:
        "rcdm study trunk-head --checkpoint {input.checkpoint} --model-flags {input.flags} "
        "--head-checkpoint {input.head_checkpoint} --head-model-flags {input.head_flags} {params.encoder} "
        "--images {input.images} --features {input.features} --head-features {input.head_features} "
        "{params.probe} {params.opts} --out {params.out} > {log} 2>&1"
