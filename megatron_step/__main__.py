"""The embedded default: a real two-stage STEP run of a tiny LLaMA on CPU, in about half a minute.

    python -m megatron_step [--out-dir DIR] [--set KEY=VALUE ...]

Needs no GPU, no network and no data files: the corpus is CPython's own documentation text
(`pydoc_data.topics`), tokenized byte by byte. The run config is `megatron_step/demo.yaml`
(the same file as examples/tiny_cpu.yaml). At the end it prints where the summary, the metrics,
the plots and the final checkpoint are. Running it again with the same --out-dir resumes (or, if
it finished, just rewrites the summary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_step import train

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code of the training run."""
    parser = argparse.ArgumentParser(prog="python -m megatron_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/step_demo",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the demo config (repeatable)")
    args = parser.parse_args(argv)
    train_argv = [str(DEMO_CONFIG), "--set", f"out_dir={args.out_dir}"]
    for item in args.set:
        train_argv += ["--set", item]
    return train.main(train_argv)


if __name__ == "__main__":
    sys.exit(main())
