# One RCDM per (encoder, layer), trained on the train split's images and features. Resumable checkpoints live
# in checkpoints/ beside the models, outside the declared outputs (Snakemake deletes those before a job runs),
# so a timed-out, preempted or failed job resumes where it stopped when it runs again (train.retries
# resubmits it by itself; `rcdm train --resume auto` finds the newest valid checkpoint).
import hashlib
import json

# sorted: Snakemake compares params as written, so a reordered config file would rerun everything
MODEL_FLAGS = dict(sorted({**config["model"], "image_size": config["data"]["image_size"]}.items()))
# One checkpoint folder per model configuration: a rerun with the same flags resumes, changed flags start
# afresh (old checkpoints stay until deleted).
CHECKPOINTS = f"{R}/checkpoints/{{encoder}}/{{layer}}/"
CHECKPOINTS += hashlib.sha256(json.dumps(MODEL_FLAGS, sort_keys=True).encode()).hexdigest()[:12]


rule model_flags:
    output:
        f"{R}/model_flags.json",
    params:
        flags=MODEL_FLAGS,
    log:
        f"{LOGS}/model_flags.log",
    localrule: True
    run:
        write_json(output[0], params.flags)


rule train:
    input:
        images=IMAGES.format(dataset="train"),
        features=FEATURES.format(encoder="{encoder}", dataset="train", layer="{layer}"),
        flags=rules.model_flags.output[0],
    output:
        ema=EMA,
        model=f"{MODEL}/model_final.pt",
        summary=f"{MODEL}/train_summary.json",
    log:
        f"{LOGS}/train/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/train/{{encoder}}/{{layer}}.tsv"
    params:
        out=lambda wc: opts(out=MODEL.format(**wc), ckpt_dir=CHECKPOINTS.format(**wc)),
        opts=opts(
            steps=config["train"]["steps"],
            time_budget=config["train"]["time_budget"] or 0,
            **{k: config["train"][k] for k in ("batch_size", "lr", "weight_decay")},
            ema=config["train"]["ema_rates"],
            precision=config["train"]["precision"],
            seed=config["seed"],
        ),
        extra=extra("train"),
    threads: rule_threads("train")
    resources:
        **{"gpu": 0, **rule_resources("train")},
        # the weights do not depend on these, nor on the number of processes (the batch is global, its noise
        # drawn per step; micro-batches average to the same gradient)
        run_opts=run_opts(
            **{k: config["train"][k] for k in ("microbatch", "save_interval", "log_interval", "workers")}
        ),
    retries: config["train"]["retries"]
    shell:
        # torchrun with one process per GPU when the job has several
        "$([ {resources.gpu} -gt 1 ] && echo torchrun --standalone --nproc-per-node={resources.gpu} -m) "
        "rcdm train --images {input.images} --features {input.features} --model-flags {input.flags} {params.out} "
        "--resume auto {params.opts} {params.extra} {resources.run_opts} > {log} 2>&1"

rule run_flags:
    """The full model flags of a trained run (what sampling needs to rebuild the network)."""
    input:
        rules.train.output.summary,
    output:
        f"{MODEL}/model_flags.json",
    log:
        f"{LOGS}/run_flags/{{encoder}}/{{layer}}.log",
    localrule: True
    run:
        write_json(output[0], read_json(input[0])["model_flags"])
