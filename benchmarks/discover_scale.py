"""Time and peak memory of discover() (structural) at the sizes users train: ResNet-18,
Hugging Face GPT-2 small (124M parameters) and a ~100M-parameter Llama (8 layers, width
768, GQA), plus the GPT-2-sized block of the zoo.

One process per model (peak RSS is per process), one torch thread by default. The Hugging
Face models are built from their configs with random weights (no download; needs the
``transformers`` of the ``dev`` extra) and handed over as ``model(x).logits``::

    python benchmarks/discover_scale.py                      # all, printed
    python benchmarks/discover_scale.py --models gpt2 llama-100m
    python benchmarks/discover_scale.py --models gpt2 llama-100m --layers 2

``--layers`` measures the Hugging Face models at full width and vocabulary with fewer
layers. ``Discovery.basis`` is sparse, so GPT-2 small's 219,473 candidates by 37,825
symmetries and the Llama's 187,136 by 64,003 fit (records in
``benchmarks/results/discover-scale-*``)::

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

MODELS = ("resnet18", "gpt2", "llama-100m", "gpt2-block")


def build(which: str, layers: int | None = None):
    """``(model, inputs)`` of one benchmark model; ``layers`` overrides the Hugging Face
    models' depth (12 for GPT-2, 8 for the Llama)."""
    import torch
    from torch import nn

    from manifold_nets.experiments.zoo import gpt2_block, resnet18

    if which == "resnet18":
        return resnet18(), torch.randn(256, 3, 32, 32)
    if which == "gpt2-block":
        return gpt2_block(), torch.randn(256, 16, 768)
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from manifold_nets.convert import conv1d_to_linear

    class Logits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model(tokens).logits

    if which == "gpt2":  # GPT-2 small: the transformers defaults
        model = GPT2LMHeadModel(GPT2Config(use_cache=False, n_layer=layers or 12))
        conv1d_to_linear(model)
        vocab = model.config.vocab_size
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048,
            num_hidden_layers=layers or 8,
            num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
            use_cache=False))
        vocab = 32000
    tokens = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    return Logits(model).eval(), tokens


def run_one(which: str, threads: int, layers: int | None = None) -> dict:
    import torch

    from manifold_nets.symmetry import discover

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, x = build(which, layers)
    start = time.perf_counter()
    found = discover(model, x, method="structural")
    seconds = time.perf_counter() - start
    return {"model": which, "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "inputs": list(x.shape), "candidates": found.candidates, "rank": found.rank,
            "symmetries": found.dim, "families": len(found.families),
            "seconds": round(seconds, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "verified": found.verified, "unsupported": found.unsupported,
            "family_list": [f"{f.label} ({f.size})" for f in found.families]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="which models (default: all)")
    parser.add_argument("--layers", type=int, default=None,
                        help="depth of the Hugging Face models (default: their real one)")
    parser.add_argument("--output", default=None, help="also write the report here")
    parser.add_argument("--json", default=None, help="also write the records here (JSONL)")
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.one:
        print(json.dumps(run_one(args.one, args.threads, args.layers)))
        return 0
    lines = [f"discover(method='structural'): {platform.processor() or platform.machine()}, "
             f"{args.threads} torch thread(s), one process per model"]
    records = []
    for which in args.models:
        depth = [] if args.layers is None or which in ("resnet18", "gpt2-block") else \
            ["--layers", str(args.layers)]
        out = subprocess.run([sys.executable, __file__, "--one", which, "--threads",
                              str(args.threads), *depth], capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
            lines.append(f"{which}: failed ({last})")
            print(lines[-1], flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        records.append(r)
        name = r["model"] + (f" ({r['layers']} layers)" if r.get("layers") else "")
        lines.append(f"{name}: {r['parameters']:,} parameters, inputs {r['inputs']}, "
                     f"{r['candidates']:,} candidates (span {r['rank']:,}) -> "
                     f"{r['symmetries']:,} symmetries in {r['families']} families, "
                     f"{r['seconds']} s, peak RSS {r['peak_rss_gb']} GB, random element "
                     f"changes outputs by {r['verified']:.1e}; unsupported: "
                     f"{', '.join(r['unsupported']) or 'none'}")
        lines += [f"    {f}" for f in r["family_list"]]
        print("\n".join(lines[-1 - len(r["family_list"]):]), flush=True)
    text = "\n".join(lines)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return 0 if len(records) == len(args.models) else 1


if __name__ == "__main__":
    raise SystemExit(main())
