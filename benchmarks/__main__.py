"""The benchmark runner: `python -m benchmarks <family> [options]`, run from the repository root.

Families: `perf` (sketch, estimate and build speed and memory, each against a baseline in the same
run), `fidelity` (estimates against real fine-tunes, per target), `selection` (each method's
mixture really fine-tuned; leave-out; group ranks) and `reproduce` (what a rebuild on another
thread count keeps). `python -m benchmarks <family> --help` says what each measures.

Every run prints its tables and writes them, with the command, the commit, the date, the machine
and the seeds, to benchmarks/results/<name>.json (`--name`, else one made from the options). The
docs render their tables and plots from those files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import fidelity, perf, reproduce, selection
from .common import RESULTS, write_results

FAMILIES = {"perf": perf, "fidelity": fidelity, "selection": selection, "reproduce": reproduce}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    families = top.add_subparsers(dest="family", required=True, metavar="family")
    for name, module in FAMILIES.items():
        sub = families.add_parser(name, help=module.__doc__.split(":", 1)[1].splitlines()[0].strip(),
                                  description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.add_argument("--name", help="the results file's name (default: made from the options)")
        sub.add_argument("--results", type=os.path.abspath, default=str(RESULTS),
                         help="the folder results files are written to")
    return top


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    module = FAMILIES[args.family]
    start = time.perf_counter()
    results = module.run(args)
    seconds = time.perf_counter() - start
    path = write_results(args.name or module.default_name(args), args.family, argv, args, results, seconds,
                         folder=Path(args.results))
    print(f"\n{seconds:.0f} s wall; results: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
