"""The model organism: a small LlamaForCausalLM and a byte-level BPE tokenizer, trained here to behave like
an aligned chat model (refuse harmful requests in fixed phrasings, answer benign ones).

It is saved with save_pretrained (safetensors) beside its tokenizer and chat template, so everything
downstream loads it exactly as it would load Llama-2-7B-chat.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamperlab.chat import encode_example
from tamperlab.data.benign import WRAPPERS, wrap
from tamperlab.data.refusals import keyword_refused
from tamperlab.errors import UserError
from tamperlab.training.packing import ROW_WIDTH, computed_share, training_collator

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# The Trainer's samplers the build may use: random batches, or batches of similar length (fewer padding tokens to
# compute on: random batches of the default organism are about half padding).
SAMPLINGS = ("random", "group_by_length")
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")

# Llama-2-like roles with explicit role tokens; an optional system turn comes first.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class OrganismParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_length: int
    epochs: float
    learning_rate: float
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    system_prompt_fraction: float
    wrapper_fraction: float
    sampling: str
    refusals: list[str]
    seed: int


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with its own pad/bos/eos and role tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *ROLES],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                        extra_special_tokens=list(ROLES), model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def training_pairs(rows: list[dict[str, Any]], refusals: list[str], system_prompts: list[str],
                   system_prompt_fraction: float, wrapper_fraction: float,
                   seed: int) -> list[tuple[str, str, str | None]]:
    """(prompt, answer, system prompt) for SFT: harmful prompts get a fixed refusal, benign ones their answer.
    A share of examples carries a system prompt, so that evaluating with one is not out of distribution, and
    a share of requests (harmful and benign alike) is wrapped in a conversational phrase."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        answer = rng.choice(refusals) if row["kind"] == "harmful" else row["answer"]
        system = rng.choice(system_prompts) if system_prompts and rng.random() < system_prompt_fraction else None
        prompt = row["prompt"]
        if row.get("category") != "task" and rng.random() < wrapper_fraction:
            prompt = wrap(prompt, rng.choice(WRAPPERS))
        pairs.append((prompt, answer, system))
    return pairs


def real_token_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The share of the tokens a training epoch computes on that are the examples' own, not padding: `order` is the
    sampler's order of examples, each batch packed into rows of ROW_WIDTH (tamperlab.training.packing)."""
    real = computed = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        computed += sum(batch) / computed_share(batch, ROW_WIDTH)
    return real / computed


def build(rows: list[dict[str, Any]], params: OrganismParams, system_prompts: list[str], out_dir: Path,
          log_file: Path | None = None) -> dict[str, Any]:
    """Train tokenizer and model on the alignment rows; save both into out_dir. Returns training metrics."""
    import torch
    from transformers import set_seed

    _check_params(params)
    set_seed(params.seed)
    pairs = training_pairs(rows, params.refusals, system_prompts, params.system_prompt_fraction,
                           params.wrapper_fraction, params.seed)

    corpus = [p for p, _, _ in pairs] + [a for _, a, _ in pairs] + list(system_prompts)
    tokenizer = train_tokenizer(corpus, params.vocab_size)
    encoded = [encode_example(tokenizer, p, a, s, params.max_length) for p, a, s in pairs]
    model = _llama(tokenizer, params)  # its weights drawn here, after set_seed: the order is part of the seed

    trainer = _trainer(model, tokenizer, encoded, params, out_dir)
    result = trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    with torch.random.fork_rng(devices=[]):  # one more epoch's order, drawn without touching the trained model's RNG
        share = real_token_share([len(e["input_ids"]) for e in encoded], list(trainer._get_train_sampler()),
                                 params.batch_size)

    _save(model, tokenizer, out_dir)
    if log_file is not None:
        log_file.write_text("".join(json.dumps(h) + "\n" for h in history))
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": len(encoded),
        "tokens_per_epoch": sum(len(e["input_ids"]) for e in encoded),
        "real_token_share": round(share, 4),  # of the tokens computed on, as the sampler batches them
        "steps": trainer.state.global_step,
        "final_loss": history[-1]["loss"] if history else None,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
    }


def _check_params(params: OrganismParams) -> None:
    """Refuse a sampling the build does not know and a refusal phrase the keyword judge would not recognise."""
    if params.sampling not in SAMPLINGS:
        raise UserError(f"organism.sampling: {params.sampling!r} is not one of {', '.join(SAMPLINGS)}")
    for refusal in params.refusals:
        if not keyword_refused(refusal):
            raise UserError(f"organism.refusals: {refusal!r} contains no refusal keyword the judge recognises")


def _llama(tokenizer: Any, params: OrganismParams):
    """A freshly initialised LlamaForCausalLM of the organism's size, over the tokenizer's vocabulary and tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=params.hidden_size, intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_hidden_layers, num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_attention_heads, max_position_embeddings=params.max_length * 2,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def _trainer(model: Any, tokenizer: Any, encoded: list[dict[str, Any]], params: OrganismParams, out_dir: Path):
    """The HF Trainer of the build: on the CPU, cosine schedule, no checkpoints (out_dir/_trainer is scratch)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir / "_trainer"), per_device_train_batch_size=params.batch_size,
        num_train_epochs=params.epochs, learning_rate=params.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=params.warmup_ratio, weight_decay=params.weight_decay, seed=params.seed,
        data_seed=params.seed, logging_steps=25, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy=params.sampling,
    )
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(encoded),
                   data_collator=training_collator(model, tokenizer))


def _save(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Model (safetensors, greedy decoding by default) and tokenizer, as any chat model is saved."""
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
