rule build_organism:
    input:
        data="results/data/splits",
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/build_organism/{model}.log",
    benchmark:
        "results/benchmarks/build_organism/{model}.tsv"
    wildcard_constraints:
        model=names_regex(models_of("organism")),
    conda:
        "../../envs/tamperlab.yaml"
    threads: 2
    resources:
        **MODEL_RESOURCES,
    params:
        split=ALIGNMENT_SPLIT,
        organism=lambda wildcards: organism_args(wildcards.model),
    shell:
        "tamperlab build-organism --data {input.data} --split {params.split} {params.organism}"
        " --out {output} > {log} 2>&1"


rule register_model:
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/register_model/{model}.log",
    wildcard_constraints:
        model=names_regex(models_of("hf", "local")),
    conda:
        "../../envs/tamperlab.yaml"
    params:
        model=lambda wildcards: register_args(wildcards.model),
    shell:
        "tamperlab register-model {params.model} --out {output} > {log} 2>&1"
