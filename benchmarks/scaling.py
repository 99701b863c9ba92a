"""What 2 processes give on this machine for perfectly independent work: the ceiling against which
the "2 workers >= 1.7x one" targets of `clean` (issue 3) and `pack` (issue 4) are to be read.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/scaling.py [--repeats 5]

Cases (one JSON line each, from :func:`text2llm.workers.process_scaling`): ``python_loop``
(integer arithmetic in the interpreter: no memory traffic, nothing shared) and ``numpy_stream``
(sums over a 64 MB array: memory bandwidth). Each runs alone in one process, then as two
processes at once; ``speedup_2_procs`` = 2 x (one alone) / (two at once), from the best of
``--repeats`` interleaved rounds. 2.0 means two independent cores; a VM whose two vCPUs share a
physical core, or a busy host, gives less, and no pipeline of separate worker processes can scale
better than this on the same machine.

``benchmarks/clean.py`` and ``benchmarks/tokenize.py`` print the same case before and after their
own, so that every results file carries the ceiling of the session it was measured in.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    from text2llm.workers import process_scaling

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    for rec in process_scaling(ap.parse_args().repeats):
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
