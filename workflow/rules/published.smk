# RCDMs taken from a weight file instead of trained here (encoders.<name>.rcdm: `published` or a file name in
# weights_dir): `rcdm flags` reads the full model flags off the file (the config's `model` section supplies what
# a state dict cannot show: heads, dropout, ...) and checks them on the meta device, in seconds, before any GPU
# job. rcdm_files() (common.smk) routes sampling, evaluation, the studies and the tradeoff to these files, so
# no training job is in the DAG of such a run. A published file missing from weights_dir is fetched by `fetch`
# (fetch_weights: true) or is an error naming its URL.


rule file_flags:
    input:
        checkpoint=lambda wc: rcdm_files(wc.encoder, wc.layer)["checkpoint"],
    output:
        f"{MODEL}/file_flags.json",
    log:
        f"{LOGS}/file_flags/{{encoder}}/{{layer}}.log",
    params:
        # the config's flags over what the file shows: a contradiction (e.g. num_channels) is an error here
        flags=opts(model_flags=json.dumps(MODEL_FLAGS, sort_keys=True)),
        trust="--trust-checkpoint" if config["trust_checkpoints"] else "",
    localrule: True
    shell:
        "rcdm flags {input.checkpoint} {params.flags} --out {output} {params.trust} > {log} 2>&1"
