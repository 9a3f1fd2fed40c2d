# one job per run of the grid: (lr, rank), snapshotted at every steps value (one_job: false, for clusters)
rule attack:
    input:
        unpack(attack_answers),
        model=attacked_checkpoint,
        data="results/data/splits",
    output:
        directory("results/attacks/{model}/{defence}/{attack}/{run}"),
    log:
        "logs/attack/{model}/{defence}/{attack}/{run}.log",
    benchmark:
        "results/benchmarks/attack/{model}/{defence}/{attack}/{run}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(config["defences"]),
        attack=names_regex(one_job_attacks(False)),
        run=names_regex(all_runs(one_job_attacks(False))),
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    # Before ready evaluations, as harden: an attack heads its run's evaluation, a branch's longest job (measured on
    # SmolLM2: one run's attack left till last, its evaluation then ran alone while the other core idled).
    priority: 1
    resources:
        **MODEL_RESOURCES,
    params:
        launch=launcher,
        step="attack",
        attack=attack_params,
        zero3=zero3_flags,
    shell:
        "{params.launch} {params.step} --model {input.model} --data {input.data} {params.attack}"
        " {params.zero3} --out {output} > {log} 2>&1"


# one_job: true: every run of the grid in one process (small models, where imports rival a run's training)
use rule attack as attack_grid with:
    output:
        directory("results/attacks/{model}/{defence}/{attack}"),
    log:
        "logs/attack_grid/{model}/{defence}/{attack}.log",
    benchmark:
        "results/benchmarks/attack_grid/{model}/{defence}/{attack}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(config["defences"]),
        attack=names_regex(one_job_attacks(True)),
    params:
        launch=launcher,
        step="attack-grid",
        attack=attack_params,
        zero3=zero3_flags,
