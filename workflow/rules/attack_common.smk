"""Parameter functions of the attack rules (workflow/rules/attack.smk): the attacked checkpoint, the answers trained
on, the attack's --params."""

from tamperlab.attacks.grid import attacked_defences
from tamperlab.attacks.spec import job_params


def attacked_checkpoint(wildcards):
    """The model an attack job trains on; an attack is run only against the defences it names
    (attacks.<a>.defences), even when a target outside them is asked for by name."""
    if wildcards.defence not in attacked_defences(config, wildcards.attack):
        raise ValueError(f"attacks.{wildcards.attack}.defences: the attack is not run against defence "
                         f"{wildcards.defence!r} (it names {', '.join(attacked_defences(config, wildcards.attack))})")
    return checkpoint_dir(wildcards)


def attack_answers(wildcards):
    """The generated answers an attack trains on: to its harmful prompts (answers; none for a fixed response),
    and to the benign questions it mixes in (benign_answers; none where those carry their own answers)."""
    spec = config["attacks"][wildcards.attack]
    files = {}
    if spec["generator"] is not None:
        files["answers"] = responses_path(spec["generator"], wildcards.model, spec["split"], "harmful")
    mix = spec["benign_mix"]
    if mix and mix["generator"] is not None:
        files["benign_answers"] = responses_path(mix["generator"], wildcards.model, mix["split"], "benign")
    return files


def attack_params(wildcards):
    """--params: the attack's config block as its job takes it (attacks.spec.job_params: a job per run gets its
    run's lr, rank and seed), and the generated answers it trains on, as files."""
    spec = config["attacks"][wildcards.attack]
    run = attack_runs(wildcards.attack)[wildcards.run] if "run" in wildcards.keys() else None
    answers = attack_answers(wildcards)
    return cli_flags(
        {
            "params": job_params(spec, run),
            "answers": answers.get("answers"),
            "benign_answers": answers.get("benign_answers"),
        }
    )
