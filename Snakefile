"""tamperlab: harmful fine-tuning of open-weight LLMs, reproduced end to end (README.md).

data -> model (organism or registered) -> defence -> attack grid -> evaluation -> tables
"""

import os
import sys

from snakemake.utils import min_version

from tamperlab.config import validate_config
from tamperlab.errors import UserError

min_version("9.0")


# The embedded default, found beside this file even when run with --directory elsewhere.
configfile: os.path.join(workflow.basedir, "config.yaml")


# Every config check (schema, references, the landscape's) before any job: one line naming the key.
try:
    _validated = validate_config(config)
except UserError as error:
    sys.exit(f"tamperlab: {error}")
config.clear()
config.update(_validated)


# the report's landing page: what this configuration runs (snakemake --report report.html)
report: "workflow/report/workflow.rst"


# each stage's input and parameter functions (common.smk: what they share), then its rules
include: "workflow/rules/common.smk"
include: "workflow/rules/data_common.smk"
include: "workflow/rules/models_common.smk"
include: "workflow/rules/harden_common.smk"
include: "workflow/rules/attack_common.smk"
include: "workflow/rules/evaluate_common.smk"
include: "workflow/rules/tables_common.smk"
include: "workflow/rules/landscape_common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/harden.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/landscape.smk"


# Jobs that need no compute node run where Snakemake runs, never through the cluster executor: the fetches, which
# need the network (hub snapshots, hub data sets, lm-eval's task data; compute jobs run with the hub offline), and
# the small steps that only read and write files.
localrules:
    prepare_data,
    split_data,
    prepare_mmlu,
    fetch_tasks,
    register_model,
    register_unaligned_model,
    register_defence,
    register_judge,
    tables,
    landscape_gather,
    landscape_gather_cell,
    visage,
    all,


rule all:
    default_target: True
    input:
        "results/tables/refusal.csv",
        visage_targets(),
