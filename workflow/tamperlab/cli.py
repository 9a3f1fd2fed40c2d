"""The `tamperlab` command: one subcommand per workflow step, every parameter explicit on the command line.

Each Snakemake rule runs exactly one of these, so `snakemake -n -p` shows the whole step and a reviewer can
re-run it by hand. The subcommands live in tamperlab.commands, one module per rule file; this module only
assembles them. User errors print one line and exit 2; every step writes a manifest (provenance.Step).

Only the steps that fetch from the Hugging Face hub (ONLINE: local rules, on a machine that reaches it) go online;
every other step runs with the hub offline (HF_HUB_OFFLINE=1, unless the environment sets it) and reads what
those fetched from the cache: a compute job never downloads a model or a data set.
"""

from __future__ import annotations

import argparse
import os
import sys

from tamperlab import methods
from tamperlab.commands import attack, audit, compare, data, evaluate, harden, landscape, models, profile, tables
from tamperlab.errors import UserError
from tamperlab.runtime import cpu, logs, numerics

COMMAND_MODULES = (data, models, harden, attack, evaluate, tables, landscape, compare, audit, profile)
ONLINE = ("register-model", "prepare-data", "fetch-tasks")  # hub snapshots, hub data sets, lm-eval's task data


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UserError(f"{self.prog}: {message}")


def _plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this module first: it registers methods of its own (the config's plugins:)")


def load_plugins(argv: list[str] | None) -> None:
    """The --plugin modules, imported before the parser is built: their methods are among its choices."""
    pre = argparse.ArgumentParser(add_help=False)
    _plugin_argument(pre)
    methods.load_plugins(pre.parse_known_args(argv)[0].plugin, key="--plugin")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tamperlab", description=__doc__.splitlines()[0])
    _plugin_argument(parser)
    parser.add_argument("--numerics", choices=numerics.MODES, default=numerics.DEFAULT,
                        help="CPU numerics (default %(default)s: the same bits on any x86-64 CPU with AVX2; native: "
                             "the CPU's fastest kernels, bit-exact on the same CPU kind only). Pinned before torch "
                             "loads; every manifest records it")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    command = "tamperlab"
    logs.setup()  # the one place logging is configured
    try:
        load_plugins(argv)
        args = build_parser().parse_args(argv)
        command = f"tamperlab {args.command}"
        if args.command not in ONLINE:  # before any hub library is imported: they read it once
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        numerics.pin(args.numerics)  # before torch is imported: MKL, ATen and oneDNN read it once
        cpu.fit_threads(portable=args.numerics == "portable")  # before torch is imported, too
        status = args.func(args)
    except UserError as error:
        message = str(error)
        if not message.startswith("tamperlab"):
            message = f"{command}: error: {message}"
        print(message, file=sys.stderr)
        sys.exit(2)
    if isinstance(status, int) and status:  # a command's own exit status (compare: 1 when a cell differs)
        sys.exit(status)


if __name__ == "__main__":
    main()
