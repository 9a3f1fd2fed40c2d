rule harden:
    input:
        model="results/models/{model}/base",
        data="results/data/splits",
        anchor=harden_anchor,
        benign_answers=harden_answers,
    output:
        directory("results/models/{model}/{defence}"),
    log:
        "logs/harden/{model}/{defence}.log",
    benchmark:
        "results/benchmarks/harden/{model}/{defence}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(defences_from("train")),
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    # Before ready evaluations: a defence's training heads the longest branch (its attack grid and evaluations
    # follow), and the evaluations can run beside it (measured on SmolLM2: started last, RepNoise began 400 s late).
    priority: 1
    resources:
        **MODEL_RESOURCES,
    params:
        launch=harden_launcher,
        harden=harden_args,
        zero3=harden_sharding_flags,
        anchor=lambda wildcards, input: f"--anchor {input.anchor}" if input.anchor else "",
    shell:
        "{params.launch} harden --model {input.model} --data {input.data} {params.harden}"
        " {params.anchor} {params.zero3} --out {output} > {log} 2>&1"


# a released hardened checkpoint (e.g. the RepNoise or TAR release) stands in for training
rule register_defence:
    output:
        directory("results/models/{model}/{defence}"),
    log:
        "logs/register_defence/{model}/{defence}.log",
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(defences_from("hf", "local")),
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        model=lambda wildcards: register_args(wildcards.defence, config["defences"]),
    shell:
        "tamperlab {params.numerics} register-model {params.model} --out {output} > {log} 2>&1"
