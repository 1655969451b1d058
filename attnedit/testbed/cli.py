"""`attnedit testbed train ...`: the testbed's training recipe on the command line."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .train import __doc__ as train_doc
    from .train import build_parser

    p = sub.add_parser("testbed", help="the synthetic testbed: train its models")
    actions = p.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", parents=[build_parser(add_help=False)], help="train shapes-sd",
                               description=train_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.set_defaults(func=_train)
    from .train_dit import __doc__ as dit_doc
    from .train_dit import build_parser as dit_parser

    dit = actions.add_parser("train-dit", parents=[dit_parser(add_help=False)], help="train shapes-dit",
                             description=dit_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    dit.set_defaults(func=_train_dit)


def _train(args: argparse.Namespace) -> int:
    from .train import run

    return run(args)


def _train_dit(args: argparse.Namespace) -> int:
    from .train_dit import run

    return run(args)
