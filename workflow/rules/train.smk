# One RCDM per (encoder, layer), trained on the train split's images and features. Resumable checkpoints live
# in checkpoints/ beside the models, outside the declared outputs (Snakemake deletes those before a job runs),
# so a timed-out, preempted or failed job resumes where it stopped when it runs again (train.retries
# resubmits it by itself; `rcdm train --resume auto` finds the newest valid checkpoint).
import hashlib
import json

MODEL_FLAGS = {**config["model"], "image_size": config["data"]["image_size"]}
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
        # `rcdm` for one process; torchrun with one process per GPU when the rule has several GPUs
        launch=lambda wc, resources: (
            f"torchrun --standalone --nproc-per-node={resources.gpu} -m rcdm"
            if int(getattr(resources, "gpu", 0) or 0) > 1
            else "rcdm"
        ),
        out=lambda wc: opts(out=MODEL.format(**wc), ckpt_dir=CHECKPOINTS.format(**wc)),
        opts=opts(
            steps=config["train"]["steps"],
            time_budget=config["train"]["time_budget"] or 0,
            **{k: config["train"][k] for k in ("batch_size", "microbatch", "lr", "weight_decay")},
            ema=config["train"]["ema_rates"],
            **{k: config["train"][k] for k in ("precision", "save_interval", "log_interval", "workers")},
            seed=config["seed"],
        ),
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
        f"{MODEL}/model_flags.json",
    log:
        f"{LOGS}/run_flags/{{encoder}}/{{layer}}.log",
    localrule: True
    run:
        write_json(output[0], read_json(input[0])["model_flags"])
