"""Accuracy-retention harness: ``python -m ds_moe_replicate.eval --model tiny-switch --task synthetic``.

See ``harness.py`` for the modes and ``cli.py`` for the options.
"""

from .harness import MODES, EvalArgs, markdown_table, run_eval

__all__ = ["EvalArgs", "run_eval", "markdown_table", "MODES", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
