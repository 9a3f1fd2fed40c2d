"""An evaluation's settings as its job takes them: evaluation.refusal and evaluation.capability as the rules resolve
them (workflow/rules/evaluate_common.smk: the system prompt's text, the judge's model, the run's seed), one JSON
object on the command line (`--params`) and one dataclass each here; how responses are generated and judged
(JudgeParams) is shared with the landscape's scans. Every key is given: the schema resolved the defaults.

Pure Python, no torch: the landscape's spec (imported by the Snakefile) builds on JudgeParams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tamperlab import methods
from tamperlab.errors import UserError


@dataclass(kw_only=True)
class JudgeParams:
    """How responses are generated and judged: the refusal evaluations and the landscape's points alike."""

    judge: str  # a registered judge (tamperlab.methods)
    classifier_model: str | None  # the judge model (classifier, harmbench, llama_guard): hub id or directory
    classifier_revision: str | None
    refusal_label: str | None  # judge classifier: the label that means refused
    max_new_tokens: int
    batch_size: int
    compliance_marker: str | None  # a non-refused response containing this counts as complied

    def __post_init__(self) -> None:
        methods.get("judge", self.judge, "--params judge")


@dataclass(kw_only=True)
class RefusalParams(JudgeParams):
    """evaluation.refusal: generate on a split's prompts and judge refusals."""

    split: str
    system_prompt: str | None  # its text (the rules look the name up in system_prompts)
    prompt_limit: int | None  # the split's first LIMIT harmful and first LIMIT benign prompts; null: all
    benign_limit: int | None  # of the benign prompts, the first LIMIT instead (0: all); null: prompt_limit
    false_refusal_judge: str | None  # xstest: judge the benign prompts with XSTest's string match, not `judge`
    seed: int
    # (defaults: an evaluation recorded before probes existed replays as it ran)
    probe_limit: int | None = None  # of each probe set (rows with `probe`), a seeded sample of LIMIT; null: all
    past_tense: bool = False  # also the evaluated harmful prompts in the past tense (the probe past_tense)
    # also the evaluated harmful prompts with the answer forced to start with a compliant answer's first k tokens,
    # for each k (the probes prefill<k>: data.probes.prefill_rows)
    prefill_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        tokens = self.prefill_tokens
        if not isinstance(tokens, list) or not all(type(k) is int and k >= 1 for k in tokens):
            raise UserError(f"--params prefill_tokens: expected integers ≥ 1, got {tokens!r}")


@dataclass(kw_only=True)
class CapabilityParams:
    """evaluation.capability: lm-eval's tasks, one call for all of them."""

    split: str  # where the organism's task questions come from
    tasks: list[str]  # lm-eval task names; organism, hazard, mmlu_subset, mmlu_cloze, mmlu_gold, answers: local
    batch_size: int
    limit: int | None  # at most this many documents per task
    seed: int
