"""Time and peak memory of discover() (structural) on ResNet-18 and a GPT-2-sized block.

One process per model (peak RSS is per process), one torch thread by default::

    python benchmarks/discover_scale.py                      # both, printed
    python benchmarks/discover_scale.py --output benchmarks/results/discover-scale.txt
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def run_one(which: str, threads: int) -> dict:
    import torch

    from manifold_nets.experiments.zoo import gpt2_block, resnet18
    from manifold_nets.symmetry import discover

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if which == "resnet18":
        model, x = resnet18(), torch.randn(256, 3, 32, 32)
    else:
        model, x = gpt2_block(), torch.randn(256, 16, 768)
    start = time.perf_counter()
    found = discover(model, x, method="structural")
    seconds = time.perf_counter() - start
    return {"model": which, "parameters": sum(p.numel() for p in model.parameters()),
            "inputs": list(x.shape), "candidates": found.candidates, "rank": found.rank,
            "symmetries": found.dim, "seconds": round(seconds, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "verified": found.verified,
            "families": [f"{f.label} ({f.size})" for f in found.families]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--output", default=None, help="also write the report here")
    parser.add_argument("--one", choices=("resnet18", "gpt2"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.threads)))
        return 0
    lines = [f"discover(method='structural'): {platform.processor() or platform.machine()}, "
             f"{args.threads} torch thread(s), one process per model"]
    for which in ("resnet18", "gpt2"):
        out = subprocess.run([sys.executable, __file__, "--one", which, "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"{r['model']}: {r['parameters']:,} parameters, inputs {r['inputs']}, "
                     f"{r['candidates']:,} candidates (span {r['rank']:,}) -> "
                     f"{r['symmetries']:,} symmetries in {r['seconds']} s, peak RSS "
                     f"{r['peak_rss_gb']} GB, random element changes outputs by "
                     f"{r['verified']:.1e}")
        lines += [f"    {f}" for f in r["families"]]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
