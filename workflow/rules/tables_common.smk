"""Input and parameter functions of the tables step (workflow/rules/tables.smk): every evaluation, the seeds'
tables, the harmfulness and tamper-resistance settings."""

from tamperlab.attacks.grid import attacked_defences, defence_seeds, seeds_against
from tamperlab.models.alignment import UNALIGNED


def evaluations(name):
    """Every unattacked checkpoint's `name` (refusal.json, capability.json), then every attack job's
    evaluation directory (which holds both for each snapshot)."""
    studied = [m for m, spec in config["models"].items() if not spec["generator_only"]]
    unattacked = [
        f"results/eval/{model}/{defence}/{name}"
        for model in studied
        for defence in config["defences"]
    ] + [f"results/eval/{model}/{UNALIGNED}/{name}" for model in aligned_models()]
    attacked = []
    for model in studied:
        for defence in config["defences"]:
            for attack, spec in config["attacks"].items():
                if defence not in attacked_defences(config, attack):
                    continue
                prefix = f"results/eval/{model}/{defence}/{attack}"
                if spec["one_job"]:
                    attacked.append(prefix)
                else:
                    seeds = seeds_against(config, attack, defence)
                    attacked += [
                        f"{prefix}/{run}"
                        for run, spec in attack_runs(attack).items()
                        if spec["seed"] in seeds
                    ]
    return unattacked + attacked


def several_seeds():
    """Whether any attack trains its grid under several seeds (a grid dimension: tamperlab.attacks.grid)."""
    return any(len(_grid(name)[4]) > 1 for name in config["attacks"])


def seeds_table():
    """The tables rule's refusal_seeds.csv output, where an attack has several seeds ({} otherwise)."""
    return {"seeds": "results/tables/refusal_seeds.csv"} if several_seeds() else {}


def defence_seeds_table():
    """The tables rule's defence_seeds.csv output, where a defence trains under several seeds ({} otherwise)."""
    return {"defence_seeds": "results/tables/defence_seeds.csv"} if defence_seeds(config) else {}


def tables_params():
    """The step's settings as one --params (reporting.settings.TablesParams): the utility bound, which attacks make
    the harmfulness table (harmful-prompt ones) and the hazard figures, the tamper-resistance metrics, a paper's
    numbers, the defences trained under several seeds."""
    capability = config["evaluation"]["capability"]
    attacks = config["attacks"]
    return cli_flags(
        {
            "params": {
                "capability_metric": capability["metric"],
                "utility": config["evaluation"]["utility"],
                "hazard_metric": capability["hazard_metric"],
                "retain_metric": capability["retain_metric"],
                "harmfulness_attacks": [n for n, s in attacks.items() if not s["family"]],
                "hazard_attacks": [n for n, s in attacks.items() if s["family"]],
                "published": config["published"],
                "defence_seeds": defence_seeds(config),
            }
        }
    )


def published_visage():
    """visage.csv, where the config has a landscape and published VISAGE numbers to put beside it (only then:
    otherwise the tables need not wait for the scans)."""
    wanted = any(entry["table"] == "visage" for entry in config["published"])
    return visage_targets() if wanted else []
