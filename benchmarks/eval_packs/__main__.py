"""python -m benchmarks.eval_packs [FAMILY...]: rebuild the offline packs (all families by default)."""
from __future__ import annotations

import argparse
import importlib

from qwen2.eval.datasets import PACKS_DIR

FAMILIES = ("multiple_choice", "math", "bbh", "ifeval", "mt_bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("families", nargs="*", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--out", default=PACKS_DIR, help=f"where the packs go (default {PACKS_DIR})")
    args = parser.parse_args()
    for family in args.families:
        for path in importlib.import_module(f"benchmarks.eval_packs.{family}").build(args.out):
            print(f"{family}: wrote {path}")


if __name__ == "__main__":
    main()
