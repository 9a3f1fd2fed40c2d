"""The `tamperlab` command: one subcommand per workflow step, every parameter explicit on the command line.

Each Snakemake rule runs exactly one of these, so `snakemake -n -p` shows the whole step and a reviewer can
re-run it by hand. The subcommands live in tamperlab.commands, one module per rule file; this module only
assembles them. User errors print one line and exit 2; every step writes a manifest (provenance.Step).
"""

from __future__ import annotations

import argparse
import sys

from tamperlab import logs
from tamperlab.commands import attack, compare, data, evaluate, harden, landscape, models, profile, tables
from tamperlab.errors import UserError

COMMAND_MODULES = (data, models, harden, attack, evaluate, tables, landscape, compare, profile)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tamperlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    command = "tamperlab"
    logs.setup()  # the one place logging is configured
    try:
        args = build_parser().parse_args(argv)
        command = f"tamperlab {args.command}"
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
