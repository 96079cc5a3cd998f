"""The ``gensample`` command (console script ``gensample = "gensample.cli:main"``).

This package only assembles the parser. Each command lives in its own module, which exposes ``register(subparsers)``
(adds its subcommand(s), with ``func`` set to the handler) and imports ``_common`` and the library, never this
package; so imports run one way: this module -> command modules -> library.

    train ict / ect / edm / ctm    train_ict, train_ect, train_edm, train_ctm
    train lct, train vae           train_lct
    train video-diffusion          train_video
    sample, video, demo            sample, video, demo
    fid, fid-stats                 fid
    lcsc                           lcsc
"""
from __future__ import annotations

import argparse
import sys

from . import demo, fid, sample, train_ctm, train_ect, train_edm, train_ict, train_lct, train_nct, train_scott, train_video
from . import video
from . import lcsc

__all__ = ["build_parser", "main"]

DESCRIPTION = "gensample: train, sample, demo, video, fid and fid-stats for consistency models."

# registration order = the order --help lists the subcommands in
TRAIN_COMMANDS = (train_ict, train_ect, train_edm, train_ctm, train_lct, train_video, train_nct, train_scott)
COMMANDS = (sample, video, demo, fid, lcsc)


def build_parser() -> argparse.ArgumentParser:
    """The full ``gensample`` parser; each leaf subcommand has ``func`` set to its handler."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="gensample", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gensample {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model")
    train_sub = train.add_subparsers(dest="method", required=True)
    for module in TRAIN_COMMANDS:
        module.register(train_sub)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the command. Bad input (ValueError, FileNotFoundError,
    CheckpointError) becomes one ``gensample: error:`` line and exit code 2 instead of a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from ..training.checkpoint import CheckpointError

        if isinstance(e, (ValueError, FileNotFoundError, CheckpointError)):
            print(f"gensample: error: {e}", file=sys.stderr)
            return 2
        raise
    return result if isinstance(result, int) else 0
