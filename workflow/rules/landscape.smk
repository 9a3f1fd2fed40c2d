# The safety landscape (Peng et al. 2024): each scan of each subject is scattered over `shards` jobs of
# contiguous grid points and gathered into results/landscape/<subject>/<scan>.csv + .png; 2D scans get the
# projections of attacked cells onto their plane; `visage` turns every scan into results/tables/visage.csv.
# A subject is model/defence or model/defence/attack/cell (config landscape.subjects, or a scan's own).
# Input and parameter functions: landscape_common.smk (included by the Snakefile).


# one shard of one scan of a model or defended model: ASR at each of its grid points
rule landscape_scan:
    input:
        unpack(landscape_inputs),
    output:
        csv="results/landscape/{model}/{defence}/shards/{scan}/{shard}of{shards}.csv",
        manifest="results/landscape/{model}/{defence}/shards/{scan}/{shard}of{shards}.manifest.json",
    log:
        "logs/landscape_scan/{model}/{defence}/{scan}/{shard}of{shards}.log",
    benchmark:
        "results/benchmarks/landscape_scan/{model}/{defence}/{scan}/{shard}of{shards}.tsv"
    wildcard_constraints:
        **LANDSCAPE_CONSTRAINTS,
        **SHARD_CONSTRAINTS,
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        scan=landscape_scan_args,
    shell:
        "tamperlab {params.numerics} landscape-scan {params.scan} --shard {wildcards.shard} --shards {wildcards.shards}"
        " --out {output.csv} > {log} 2>&1"


# the same for an attacked cell (its adapter merged into the weights)
use rule landscape_scan as landscape_scan_cell with:
    output:
        csv="results/landscape/{model}/{defence}/{attack}/{cell}/shards/{scan}/{shard}of{shards}.csv",
        manifest="results/landscape/{model}/{defence}/{attack}/{cell}/shards/{scan}/{shard}of{shards}.manifest.json",
    log:
        "logs/landscape_scan/{model}/{defence}/{attack}/{cell}/{scan}/{shard}of{shards}.log",
    benchmark:
        "results/benchmarks/landscape_scan/{model}/{defence}/{attack}/{cell}/{scan}/{shard}of{shards}.tsv"
    wildcard_constraints:
        **LANDSCAPE_CONSTRAINTS,
        **CELL_CONSTRAINTS,
        **SHARD_CONSTRAINTS,


# attacked cells' coordinates in a 2D scan's plane, from the same directions on the same kind of device
rule landscape_project:
    input:
        unpack(landscape_project_inputs),
    output:
        projections="results/landscape/{model}/{defence}/{scan}_projections.json",
        manifest="results/landscape/{model}/{defence}/{scan}_projections.manifest.json",
    log:
        "logs/landscape_project/{model}/{defence}/{scan}.log",
    benchmark:
        "results/benchmarks/landscape_project/{model}/{defence}/{scan}.tsv"
    wildcard_constraints:
        **LANDSCAPE_CONSTRAINTS,
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        project=landscape_project_args,
    shell:
        "tamperlab {params.numerics} landscape-project {params.project} --out {output.projections} > {log} 2>&1"


use rule landscape_project as landscape_project_cell with:
    output:
        projections="results/landscape/{model}/{defence}/{attack}/{cell}/{scan}_projections.json",
        manifest="results/landscape/{model}/{defence}/{attack}/{cell}/{scan}_projections.manifest.json",
    log:
        "logs/landscape_project/{model}/{defence}/{attack}/{cell}/{scan}.log",
    benchmark:
        "results/benchmarks/landscape_project/{model}/{defence}/{attack}/{cell}/{scan}.tsv"
    wildcard_constraints:
        **LANDSCAPE_CONSTRAINTS,
        **CELL_CONSTRAINTS,


# every shard of a scan into its CSV (grid order) and figure
rule landscape_gather:
    input:
        unpack(landscape_gather_inputs),
    output:
        csv=report(
            "results/landscape/{model}/{defence}/{scan}.csv",
            caption="../report/landscape_scan.rst",
            category="Landscape scans",
            subcategory="{model}/{defence}",
        ),
        figure=report(
            "results/landscape/{model}/{defence}/{scan}.png",
            caption="../report/landscape_scan.rst",
            category="Landscape scans",
            subcategory="{model}/{defence}",
        ),
        manifest="results/landscape/{model}/{defence}/{scan}.manifest.json",
    log:
        "logs/landscape_gather/{model}/{defence}/{scan}.log",
    wildcard_constraints:
        **LANDSCAPE_CONSTRAINTS,
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        subject=lambda wildcards: _wildcard_subject(wildcards)["subject"],
    shell:
        "tamperlab {params.numerics} landscape-gather --subject {params.subject} --scan {wildcards.scan}"
        " --shard {input.shards} --projections {input.projections}"
        " --out-csv {output.csv} --out-figure {output.figure} > {log} 2>&1"


use rule landscape_gather as landscape_gather_cell with:
    output:
        csv=report(
            "results/landscape/{model}/{defence}/{attack}/{cell}/{scan}.csv",
            caption="../report/landscape_scan.rst",
            category="Landscape scans",
            subcategory="{model}/{defence}/{attack}/{cell}",
        ),
        figure=report(
            "results/landscape/{model}/{defence}/{attack}/{cell}/{scan}.png",
            caption="../report/landscape_scan.rst",
            category="Landscape scans",
            subcategory="{model}/{defence}/{attack}/{cell}",
        ),
        manifest="results/landscape/{model}/{defence}/{attack}/{cell}/{scan}.manifest.json",
    log:
        "logs/landscape_gather/{model}/{defence}/{attack}/{cell}/{scan}.log",
    wildcard_constraints:
        **LANDSCAPE_CONSTRAINTS,
        **CELL_CONSTRAINTS,


rule visage:
    input:
        **landscape_scans(),
        refusal=visage_evaluations(),
        capability=visage_capabilities(),
    output:
        table=report(
            "results/tables/visage.csv",
            caption="../report/visage.rst",
            category="Tables",
            subcategory="Safety landscape",
        ),
        figures=report(
            directory("results/figures/landscape"),
            patterns=["{name}.png"],
            caption="../report/landscape_figures.rst",
            category="Figures",
            subcategory="Safety landscape",
        ),
        manifest="results/tables/visage.manifest.json",
    log:
        "logs/visage.log",
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        visage=visage_params(),
    shell:
        "tamperlab {params.numerics} visage --scan {input.scans} --projections {input.projections}"
        " --refusal {input.refusal} --capability {input.capability} {params.visage} --out-table {output.table}"
        " --out-figures {output.figures} > {log} 2>&1"
