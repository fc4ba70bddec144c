"""The CPU's measured matmul peak: GFLOP/s of a 2048 x 2048 fp32 matmul with torch's default
threads (what training uses). Prints `BENCH_JSON {...}`; run in its own process.

    python -m bench.matmul_peak [--repeats 20]

`best` is the fastest repeat (the machine's peak when nobody else runs), `median` the typical
one under the current load. A training step's fraction of peak = its FLOPs / its seconds /
best.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

SIZE = 2048


def measure(repeats: int = 20, size: int = SIZE) -> dict:
    import torch
    torch.manual_seed(0)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    flops = 2 * size ** 3
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(flops / (time.perf_counter() - started) / 1e9)
    return {"size": size, "threads": torch.get_num_threads(), "repeats": repeats,
            "best_gflops": max(rates), "median_gflops": statistics.median(rates),
            "rates": rates}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    print("BENCH_JSON " + json.dumps(measure(args.repeats)), flush=True)


if __name__ == "__main__":
    main()
