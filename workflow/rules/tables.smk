# Result tables in the shape of the paper's Table 1, from every run's metrics.csv (`rcdm tabulate`).


rule tabulate:
    input:
        [METRICS.format(encoder=encoder, layer=layer) for encoder, layer in RUNS],
    output:
        all=f"{R}/tables/metrics_all.csv",
        table=report(f"{R}/tables/table1.csv", caption="../report/table.rst", category="Results"),
        markdown=f"{R}/tables/table1.md",
    log:
        f"{LOGS}/tabulate.log",
    benchmark:
        f"{BENCH}/tabulate.tsv"
    params:
        out_dir=lambda wc, output: Path(output.table).parent,
    threads: rule_threads("tabulate")
    resources:
        **rule_resources("tabulate"),
    shell:
        "rcdm tabulate {input} --out-dir {params.out_dir} > {log} 2>&1"
