"""`attnedit testbed train ...`: the testbed's training recipe on the command line.

The argument definitions live in `options.py`, apart from the recipes (which import torch), so `--help` is instant.
"""

from __future__ import annotations

import argparse

from .options import module_doc, pretrain_text_parser, train_dit_parser, train_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="the synthetic testbed: train its models")
    actions = p.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", parents=[train_parser(add_help=False)], help="train shapes-sd",
                               description=module_doc("attnedit.testbed.train"),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    train.set_defaults(func=_train)
    dit = actions.add_parser("train-dit", parents=[train_dit_parser(add_help=False)], help="train shapes-dit",
                             description=module_doc("attnedit.testbed.train_dit"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    dit.set_defaults(func=_train_dit)
    text = actions.add_parser("pretrain-text", parents=[pretrain_text_parser(add_help=False)],
                              help="pretrain a CLIP-style text encoder against world images",
                              description=module_doc("attnedit.testbed.clip"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    text.set_defaults(func=_pretrain_text)


def _train(args: argparse.Namespace) -> int:
    from .train import run

    return run(args)


def _train_dit(args: argparse.Namespace) -> int:
    from .train_dit import run

    return run(args)


def _pretrain_text(args: argparse.Namespace) -> int:
    import json

    from .clip import pretrain

    print(json.dumps(pretrain(args), indent=2))
    return 0
