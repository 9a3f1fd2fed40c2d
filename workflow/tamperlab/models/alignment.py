"""Safety tuning, the step that made Llama-2-Chat refuse and that every paper here starts from: supervised
fine-tuning on the alignment split's harmful prompts answered with refusals (several phrasings, in turn), mixed with
benign prompts answered by the model's own answers from before alignment (self-distillation: the benign half
teaches nothing new, so capability is kept while refusal is learnt).

Training is the supervised fine-tuning loop the attacks use too (training.sft: the HF Trainer, resume after a kill,
DeepSpeed); a LoRA adapter is merged into the weights, so the aligned model is an ordinary model directory.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError

UNALIGNED = "unaligned"  # a model with `align:` as registered, before safety tuning (results/models/<m>/unaligned)
ALIGN_METHODS = ("lora", "full")  # lora: trained as an adapter, then merged
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear map


@dataclass
class AlignParams:
    """models.<m>.align, less the job's threads: the `align` command's --params."""

    method: str  # lora (merged) | full
    refusal_share: float
    rank: int | None
    lora_alpha: float | None
    lr: float
    epochs: float
    batch_size: int
    max_length: int
    checkpoint_every: int
    seed: int
    split: str  # whose harmful prompts are refused and whose benign ones are self-distilled
    refusals: list[str]  # the refusal phrasings, in turn
    rephrase: list[str] = field(default_factory=lambda: ["original"])  # the harmful prompts' phrasings, in turn

    def __post_init__(self) -> None:
        from tamperlab.training.sft import default_lora_alpha

        if self.method not in ALIGN_METHODS:
            raise UserError(f"align: method {self.method!r} is not one of {', '.join(ALIGN_METHODS)}")
        if self.method == "lora" and self.lora_alpha is None:  # as SFTParams does: recorded as trained
            self.lora_alpha = default_lora_alpha(self.rank)


def alignment_examples(rows: list[dict[str, Any]], benign_answers: dict[str, str], refusals: list[str],
                       seed: int, refusal_share: float = 0.5,
                       rephrasings: list[str] = ("original",)) -> list[dict[str, str]]:
    """(prompt, response) pairs: harmful prompts of the split with the refusals in turn, as many as make them
    `refusal_share` of the mix (as far as the split has them), each asked in the next of `rephrasings`
    (data.rephrase: as it is, as a question, in the past tense), and the benign prompts with their own answers;
    shuffled with `seed`. Fewer refusals, more benign answers: less over-refusal of harmless requests; more
    phrasings: a refusal learnt for the request, not for the imperative it came in."""
    from tamperlab.data.rephrase import rephrase

    if not 0 < refusal_share < 1:
        raise UserError(f"align: refusal_share must be between 0 and 1, got {refusal_share}")
    if not refusals:
        raise UserError("align: needs at least one refusal phrasing")
    if not benign_answers:
        raise UserError("align: no benign answers to distil (the responses file is empty)")
    wanted = max(1, round(len(benign_answers) * refusal_share / (1 - refusal_share)))
    harmful = [r["prompt"] for r in rows if r["kind"] == "harmful"][:wanted]
    if not harmful:
        raise UserError("align: the alignment split has no harmful prompts")
    examples = [{"prompt": rephrase(p, rephrasings[i % len(rephrasings)]), "response": refusals[i % len(refusals)]}
                for i, p in enumerate(harmful)]
    examples += [{"prompt": p, "response": a} for p, a in benign_answers.items()]
    random.Random(seed).shuffle(examples)
    return examples


def align(model_dir: Path, examples: list[dict[str, str]], params: AlignParams, out_dir: Path,
          deepspeed: Path | None = None) -> dict[str, Any]:
    """Fine-tune the model in model_dir on `examples` and write the aligned model (LoRA merged) to out_dir."""
    from tamperlab.models.registry import load_model
    from tamperlab.runtime.launch import is_writer
    from tamperlab.training.sft import SFTParams, finetune

    steps = max(1, math.ceil(len(examples) * params.epochs / params.batch_size))
    run = out_dir / "sft"  # the training run (resumable), removed once the model is written
    run.mkdir(parents=True, exist_ok=True)
    sft = SFTParams(method=params.method, lr=params.lr, steps=[steps], rank=params.rank,
                    lora_alpha=params.lora_alpha, target_modules=TARGET_MODULES, batch_size=params.batch_size,
                    scheduler="cosine", warmup_ratio=0.1, max_length=params.max_length,
                    checkpoint_every=params.checkpoint_every, seed=params.seed)
    record = finetune(lambda: load_model(model_dir, device=None, dtype=None), examples, sft, run,
                      deepspeed=deepspeed)
    if record["status"] != "complete":
        raise UserError(f"align: training diverged at step {record['diverged_at_step']}; lower align.lr")
    snapshot = run / f"steps{steps}"
    if is_writer():
        if params.method == "lora":
            model, tokenizer = load_model(model_dir, adapter=snapshot, device="cpu", merge=True)
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        else:
            for path in snapshot.iterdir():
                shutil.move(str(path), out_dir / path.name)
        shutil.move(str(run / "loss_log.jsonl"), out_dir / "train_log.jsonl")
        shutil.rmtree(run)
    return {**record, "steps": steps}
