rule attack:
    input:
        model=checkpoint_dir,
        data="results/data/splits",
    output:
        directory("results/attacks/{model}/{defence}/{attack}/{run}"),
    log:
        "logs/attack/{model}/{defence}/{attack}/{run}.log",
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(config["defences"]),
        attack=names_regex(one_job_attacks(False)),
    conda:
        "../../envs/tamperlab.yaml"
    threads: 2
    resources:
        **MODEL_RESOURCES,
    params:
        launch=launcher,
        attack=attack_args,
        zero3=zero3_flags,
    shell:
        "{params.launch} attack --model {input.model} --data {input.data} {params.attack}"
        " {params.zero3} --out {output} > {log} 2>&1"


# one_job: true: every run of the grid in one process (small models, where imports rival a run's training)
rule attack_grid:
    input:
        model=checkpoint_dir,
        data="results/data/splits",
    output:
        directory("results/attacks/{model}/{defence}/{attack}"),
    log:
        "logs/attack_grid/{model}/{defence}/{attack}.log",
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(config["defences"]),
        attack=names_regex(one_job_attacks(True)),
    conda:
        "../../envs/tamperlab.yaml"
    threads: 2
    resources:
        **MODEL_RESOURCES,
    params:
        launch=launcher,
        attack=attack_args,
        zero3=zero3_flags,
    shell:
        "{params.launch} attack-grid --model {input.model} --data {input.data} {params.attack}"
        " {params.zero3} --out {output} > {log} 2>&1"
