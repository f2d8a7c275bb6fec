"""The ``tokenlabel`` command: ``bench``, ``train``, ``annotate``, ``labels``, ``env``.

Each subcommand lives with the code it drives and exposes two functions, imported only when that
subcommand runs (so ``tokenlabel env`` works without DALI, and ``--help`` stays fast):

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None        # exit status
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
SUBCOMMANDS = {
    "bench": ("tokenlabel.bench.cli", "benchmark every implementation side by side"),
    "train": ("tokenlabel.train", "train an LV-ViT (token labeling or class labels)"),
    "annotate": ("tokenlabel.dataloading.annotate", "make dense top-k label maps with a teacher"),
    "labels": ("tokenlabel.dataloading.labels_cli", "label-map stores: import reference .pt files, info"),
    "env": ("tokenlabel.env", "print versions and which backends work here"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenlabel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    # Only the chosen subcommand's module is imported: a broken optional dependency of one
    # subcommand must not take the others down.
    chosen = next((a for a in (argv or []) if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    status = module.run(args)
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
