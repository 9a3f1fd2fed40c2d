"""`tamperlab install-profile`: the cluster profile (profiles/slurm) where Snakemake finds it by name, so that
`snakemake --profile slurm` works from any directory, as users type it."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tamperlab.errors import UserError

SOURCE = Path(__file__).resolve().parents[3] / "profiles" / "slurm"  # the checkout (the package is installed editable)
PLACEHOLDER = re.compile(r"^(\s*)# (slurm_partition|slurm_account): <\w+>", re.MULTILINE)

DESCRIPTION = """\
Copy profiles/slurm into Snakemake's per-user profile folder (<user config dir>/snakemake/slurm, i.e.
$XDG_CONFIG_HOME/snakemake/slurm or ~/.config/snakemake/slurm on Linux; exactly where Snakemake looks), or into
--dest (e.g. /etc/xdg/snakemake/slurm for every user), filling in the partition and the account. Then
`snakemake --profile slurm --configfile experiments/<paper>.yaml` from anywhere. Refuses to replace an installed
profile unless --force."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-profile", help="install the SLURM profile so that `--profile slurm` finds it",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partition", help="sbatch -p for every job (one of `sinfo -s`); unset: the cluster's default")
    p.add_argument("--account", help="sbatch -A for every job (`sacctmgr show assoc user=$USER`); unset: guessed")
    p.add_argument("--dest", type=Path, metavar="DIR",
                   help="the profile folder to write (default: <user config dir>/snakemake/slurm)")
    p.add_argument("--force", action="store_true", help="replace a profile already installed there")
    p.set_defaults(func=run)


def user_profile_dir() -> Path:
    """Where `snakemake --profile slurm` looks after the current directory (snakemake.cli.get_profile_dir)."""
    from platformdirs import AppDirs

    return Path(AppDirs("snakemake", "snakemake").user_config_dir) / "slurm"


def filled(text: str, values: dict[str, str | None]) -> str:
    """The profile's text with each given placeholder line uncommented and set (a JSON string is a YAML one)."""
    def fill(match: re.Match) -> str:
        value = values.get(match.group(2))
        return match.group(0) if value is None else f"{match.group(1)}{match.group(2)}: {json.dumps(value)}"

    return PLACEHOLDER.sub(fill, text)


def run(args: argparse.Namespace) -> None:
    dest = (args.dest or user_profile_dir()).expanduser()
    if not SOURCE.is_dir():
        raise UserError(f"no profile at {SOURCE}: install-profile works from a checkout of tamperlab")
    for name, value in (("--partition", args.partition), ("--account", args.account)):
        if value is not None and not re.fullmatch(r"[\w.+-]+", value):
            raise UserError(f"{name} {value!r}: not a SLURM name (letters, digits, _ . + -)")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--dest {dest}: exists and is not a directory")
    if dest.exists() and any(dest.iterdir()) and not args.force:
        raise UserError(f"{dest} holds a profile already; --force replaces it")
    values = {"slurm_partition": args.partition, "slurm_account": args.account}
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for source in sorted(SOURCE.iterdir()):
            if source.is_file():
                text = source.read_text()
                (dest / source.name).write_text(filled(text, values) if source.suffix == ".yaml" else text)
    except OSError as error:
        raise UserError(f"cannot write the profile to {dest}: {error.strerror or error}") from None
    unset = [name for name, value in (("partition", args.partition), ("account", args.account)) if value is None]
    print(f"tamperlab install-profile: {SOURCE} -> {dest}"
          + (f" ({' and '.join(unset)} unset: set under default-resources in its config.yaml)" if unset else ""))
    name = "slurm" if args.dest is None else dest
    print(f"now: snakemake --profile {name} --configfile experiments/<paper>.yaml")
