"""The method registry: every defence, attack method and refusal judge by name, and what the workflow needs to know
of it. A method is one module (its entry point and its params dataclass), one config block, one entry here; the
config's validation, the rules, the commands' dispatch and their `--method` / `--judge` choices all read it.

Entries name their code as "module:attribute" text, imported only when a job runs the method: this module imports
nothing of the package's (it sits at the bottom of the layering, so every room may ask it), and a command that does
not run a method never pays for its imports.

Methods outside the package are plugins: a module that calls `register` when imported, named in the config's
`plugins:` list (validation imports them; every job gets them as `tamperlab --plugin MODULE`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from tamperlab.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    run: str | None = None  # "module:attribute": the entry point a job calls
    params: str | None = None  # "module:attribute": the dataclass its hyperparameters become
    kind: ClassVar[str] = "method"


@dataclass(frozen=True)
class Defence(Method):
    """A hardening method. Its entry point is `run(model_dir, **examples, params=, out_dir=, deepspeed=)` (and
    `anchor_dir=` where `anchor`), returning a dict with a `status`; it writes a model directory to out_dir."""

    block: str | None = None  # defences.<d>.<block>: the key of its hyperparameters
    schema: dict[str, Any] | None = None  # that block's JSON schema (defaults filled in by validation)
    trains: bool = True  # made by the harden stage; False: the model as it is (none)
    data: str = "pairs"  # what it trains on: data.examples.hardening_examples ("pairs" or "forget_retain")
    sharded_run: str | None = None  # its entry point under torchrun, each parameter sharded (FSDP2)
    anchor: bool = False  # a retain loss anchored to a model's hidden states (defences.<d>.anchor)
    kind: ClassVar[str] = "defence"


@dataclass(frozen=True)
class Attack(Method):
    """A fine-tuning attack method: its runs are SFTParams, trained by `run`."""

    adapter: bool = False  # trains a LoRA adapter: its grid has ranks, its snapshots load on the attacked model
    kind: ClassVar[str] = "attack"


@dataclass(frozen=True)
class Judge(Method):
    """A refusal judge: `run(classifier_model=, refusal_label=, classifier_revision=)` returns it."""

    needs_model: bool = False  # reads evaluation.refusal.classifier
    kind: ClassVar[str] = "judge"


KINDS = {cls.kind: cls for cls in (Defence, Attack, Judge)}
_REGISTRY: dict[str, dict[str, Method]] = {kind: {} for kind in KINDS}


def register(method: Method) -> Method:
    """Add a method under its kind; registering the same entry again (a module imported twice) is a no-op."""
    known = _REGISTRY[method.kind].get(method.name)
    if known is not None and known != method:
        raise UserError(f"{method.kind} {method.name!r} is registered already, differently")
    _REGISTRY[method.kind][method.name] = method
    return method


def names(kind: str) -> tuple[str, ...]:
    return tuple(_REGISTRY[kind])


def get(kind: str, name: str, key: str | None = None) -> Any:
    """The entry of a registered method; an unknown name is one line naming `key` (or the kind)."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise UserError(f"{key or kind}: {name!r} is not a registered {kind} (those: "
                        f"{', '.join(names(kind))}; a plugin's need `plugins:`)") from None


def defences(**wanted: Any) -> list[Defence]:
    """The registered defences whose fields have these values (e.g. trains=True)."""
    return [d for d in _REGISTRY["defence"].values() if all(getattr(d, k) == v for k, v in wanted.items())]


def load(reference: str) -> Any:
    """The object a "module:attribute" reference names, imported now."""
    module, _, attributes = reference.partition(":")
    found = importlib.import_module(module)
    for attribute in attributes.split("."):  # Class.method too
        found = getattr(found, attribute)
    return found


def load_plugins(modules: list[str], key: str = "plugins") -> None:
    """Import each plugin module (each registers its methods as it is imported)."""
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(f"{key}[{i}]: cannot import {module!r} ({error})") from None


# --- the built-in methods --------------------------------------------------------------------------------------

register(Defence("none", trains=False))
register(Defence("repnoise", run="tamperlab.hardening.repnoise:harden",
                 params="tamperlab.hardening.repnoise:RepNoiseParams", block="repnoise",
                 schema={"$ref": "#/$defs/repnoise"}, data="pairs"))
register(Defence("tar", run="tamperlab.hardening.tar:harden", params="tamperlab.hardening.tar:TARParams",
                 block="tar", schema={"$ref": "#/$defs/tar"}, data="forget_retain",
                 sharded_run="tamperlab.hardening.tar.sharding:harden", anchor=True))
for _name, _adapter in (("lora", True), ("full", False)):
    register(Attack(_name, run="tamperlab.attacks.finetune:attack", params="tamperlab.training.sft:SFTParams",
                    adapter=_adapter))
register(Judge("keyword", run="tamperlab.evaluation.judges:KeywordJudge.configured"))
for _name, _class in (("classifier", "ClassifierJudge"), ("harmbench", "HarmBenchJudge"),
                      ("llama_guard", "LlamaGuardJudge")):
    register(Judge(_name, run=f"tamperlab.evaluation.judges:{_class}.configured", needs_model=True))

