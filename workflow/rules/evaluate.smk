rule evaluate_refusal:
    input:
        unpack(prefill_inputs),
        model=checkpoint_dir,
        data="results/data/splits",
        judge=judge_input,
    output:
        summary="results/eval/{model}/{defence}/refusal.json",
        responses="results/eval/{model}/{defence}/refusal.jsonl",
        manifest="results/eval/{model}/{defence}/refusal.manifest.json",
    log:
        "logs/evaluate_refusal/{model}/{defence}.log",
    benchmark:
        "results/benchmarks/evaluate_refusal/{model}/{defence}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(evaluated_defences()),
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        evaluation=evaluation_flags(refusal_params()),
        placement=max_memory_flags,
    shell:
        "tamperlab {params.numerics} evaluate-refusal --model {input.model} --model-name {wildcards.model}"
        " --defence {wildcards.defence} --data {input.data} {params.evaluation}{params.placement}"
        " --out-summary {output.summary} --out-responses {output.responses} > {log} 2>&1"


rule evaluate_capability:
    input:
        unpack(capability_inputs),
        model=checkpoint_dir,
        data="results/data/splits",
    output:
        capability="results/eval/{model}/{defence}/capability.json",
        manifest="results/eval/{model}/{defence}/capability.manifest.json",
    log:
        "logs/evaluate_capability/{model}/{defence}.log",
    benchmark:
        "results/benchmarks/evaluate_capability/{model}/{defence}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(evaluated_defences()),
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        evaluation=cli_flags({"params": capability_params()}),
        task_data=task_data_flags,
        placement=max_memory_flags,
    shell:
        "tamperlab {params.numerics} evaluate-capability --model {input.model} --model-name {wildcards.model}"
        " --defence {wildcards.defence} --data {input.data} {params.evaluation}{params.task_data}"
        "{params.placement} --out {output.capability} > {log} 2>&1"


rule evaluate_run:
    input:
        unpack(capability_inputs),
        unpack(prefill_inputs),
        model=checkpoint_dir,
        run="results/attacks/{model}/{defence}/{attack}/{run}",
        data="results/data/splits",
        judge=judge_input,
    output:
        directory("results/eval/{model}/{defence}/{attack}/{run}"),
    log:
        "logs/evaluate_run/{model}/{defence}/{attack}/{run}.log",
    benchmark:
        "results/benchmarks/evaluate_run/{model}/{defence}/{attack}/{run}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(config["defences"]),
        attack=names_regex(one_job_attacks(False)),
        run=names_regex(all_runs(one_job_attacks(False))),
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        run=run_evaluation_args,
        # both blocks in one --params, by name: one flag per step, each block as evaluate-refusal and
        # evaluate-capability take it alone (the same dataclass checks it)
        evaluation=evaluation_flags({"refusal": refusal_params(), "capability": capability_params()}),
        task_data=task_data_flags,
        placement=max_memory_flags,
    shell:
        "tamperlab {params.numerics} evaluate-run --model {input.model} --run {input.run} {params.run}"
        " --model-name {wildcards.model} --defence {wildcards.defence} --attack {wildcards.attack}"
        " --data {input.data} {params.evaluation}{params.task_data}{params.placement}"
        " --out {output} > {log} 2>&1"


# one_job: true: every snapshot of the grid evaluated in one process
use rule evaluate_run as evaluate_grid with:
    input:
        unpack(capability_inputs),
        unpack(prefill_inputs),
        model=checkpoint_dir,
        run="results/attacks/{model}/{defence}/{attack}",
        data="results/data/splits",
        judge=judge_input,
    output:
        directory("results/eval/{model}/{defence}/{attack}"),
    log:
        "logs/evaluate_grid/{model}/{defence}/{attack}.log",
    benchmark:
        "results/benchmarks/evaluate_grid/{model}/{defence}/{attack}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        defence=names_regex(config["defences"]),
        attack=names_regex(one_job_attacks(True)),
