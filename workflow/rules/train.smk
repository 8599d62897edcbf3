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


# What `rcdm train` reads and how it is called: shared by the check below and the training job, so the check
# sees exactly the inputs and options the training job will.
TRAIN_INPUT = dict(
    images=IMAGES.format(dataset="train"),
    features=FEATURES.format(encoder="{encoder}", dataset="train", layer="{layer}"),
    flags=rules.model_flags.output[0],
)
TRAIN_PARAMS = dict(
    out=lambda wc: opts(out=MODEL.format(**wc), ckpt_dir=CHECKPOINTS.format(**wc)),
    opts=opts(
        steps=config["train"]["steps"],
        **{k: config["train"][k] for k in ("batch_size", "lr", "weight_decay")},
        ema=config["train"]["ema_rates"],
        precision=config["train"]["precision"],
        seed=config["seed"],
    ),
    extra=extra("train"),
)
# the weights do not depend on these, nor on the number of processes (the batch is global, its noise drawn
# per step; micro-batches average to the same gradient); time_budget is a safety cap that fails the job
TRAIN_RUN_KEYS = ("microbatch", "save_interval", "export_interval", "log_interval", "workers", "stop_margin")
TRAIN_RUN_KEYS += ("time_budget",)
TRAIN_RUN = run_opts(**{k: config["train"][k] for k in TRAIN_RUN_KEYS})
TRAIN_ARGS = (
    "--images {input.images} --features {input.features} --model-flags {input.flags} {params.out} "
    "--resume auto {params.opts} {params.extra} {resources.run_opts}"
)


rule train_check:
    """`rcdm train --check` on the head node before the training job: configuration and data errors (a
    truncated features file, a representation-size mismatch, a batch larger than the train set) fail here,
    once, as one line, never consuming a retry or a GPU allocation."""
    input:
        **TRAIN_INPUT,
    output:
        f"{MODEL}/train_check.txt",
    log:
        f"{LOGS}/train_check/{{encoder}}/{{layer}}.log",
    params:
        **TRAIN_PARAMS,
    resources:
        run_opts=TRAIN_RUN,
    localrule: True
    shell:
        check_shell(f"rcdm train --check {TRAIN_ARGS}")


rule train:
    input:
        **TRAIN_INPUT,
        check=rules.train_check.output[0],
    output:
        ema=EMA,
        model=f"{MODEL}/model_final.pt",
        summary=f"{MODEL}/train_summary.json",
    log:
        f"{LOGS}/train/{{encoder}}/{{layer}}.log",
    benchmark:
        f"{BENCH}/train/{{encoder}}/{{layer}}.tsv"
    params:
        **TRAIN_PARAMS,
    threads: rule_threads("train")
    resources:
        **train_resources(),
        run_opts=TRAIN_RUN,
    retries: config["train"]["retries"]
    shell:
        # torchrun with one process per GPU when the job has several GPUs; with several nodes, srun starts
        # one torchrun per node (common.smk: train_resources)
        "{resources.launcher} "
        f"rcdm train {TRAIN_ARGS} > {{log}} 2>&1"


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
