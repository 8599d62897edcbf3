# One RCDM per (encoder, layer), trained on the train split's images and features. Resumable checkpoints live
# in checkpoints/ beside the models, outside the declared outputs (Snakemake deletes those before a job runs),
# so a timed-out, preempted or failed job resumes where it stopped when it runs again (train.retries
# resubmits it by itself; `rcdm train --resume auto` finds the newest valid checkpoint).


rule model_flags:
    output:
        f"{R}/model_flags.json",
    params:
        flags={**config["model"], "image_size": config["data"]["image_size"]},
    log:
        f"{LOGS}/model_flags.log",
    localrule: True
    run:
        write_json(output[0], params.flags)


rule train:
    input:
        images=images_file("train"),
        features=features_file("{encoder}", "train", "{layer}"),
        flags=rules.model_flags.output[0],
    output:
        ema=ema_file("{encoder}", "{layer}"),
        model=f"{model_dir('{encoder}', '{layer}')}/model_final.pt",
        summary=f"{model_dir('{encoder}', '{layer}')}/train_summary.json",
    log:
        f"{LOGS}/train/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/train/{{encoder}}/{{layer}}.tsv"
    params:
        launch=train_launcher,
        out=lambda wc: opts(out=model_dir(wc.encoder, wc.layer), ckpt_dir=checkpoint_dir(wc.encoder, wc.layer)),
        opts=train_opts(),
        device=device_opt(),
        extra=extra("train"),
    threads: rule_threads("train")
    resources:
        **rule_resources("train"),
    retries: config["train"]["retries"]
    shell:
        "{params.launch} train --images {input.images} --features {input.features} --model-flags {input.flags} "
        "{params.out} --resume auto {params.opts} {params.device} {params.extra} > {log} 2>&1"


rule run_flags:
    """The full model flags of a trained run (what sampling needs to rebuild the network)."""
    input:
        rules.train.output.summary,
    output:
        f"{model_dir('{encoder}', '{layer}')}/model_flags.json",
    log:
        f"{LOGS}/run_flags/{{encoder}}/{{layer}}.log",
    localrule: True
    run:
        write_json(output[0], read_json(input[0])["model_flags"])
