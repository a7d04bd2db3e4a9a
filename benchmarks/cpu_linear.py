"""A float32 linear layer of a few rows: ``F.linear``, (W · xᵀ)ᵀ and oneDNN (``blipdemo/cpu_linear.py``).

    python benchmarks/cpu_linear.py [--rows 1,2,4,8,16,64] [--shape 11008x4096]

For each row count M: the median of 7 timings of ``F.linear(x, W)`` (x: (M, K), W: (N, K), float32, the LLaMA-7B
MLP's shape by default), of ``(W @ x.T).T`` and of oneDNN's inner product, and the routes ``cpu_linear`` chooses on
this machine for a float32 LM.
Decoding feeds every linear layer one row per sequence in the batch: a step of 8 rows should cost about what a step
of 1 costs (the weight is read once). The machine and its matmul peak come first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from speed import describe_machine, machine, median_time  # noqa: E402

from blipdemo import cpu_linear  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,64")
    parser.add_argument("--shape", default="11008x4096", help="N x K of the weight")
    args = parser.parse_args()
    n, k = (int(v) for v in args.shape.lower().split("x"))
    print(describe_machine(machine("cpu", torch.float32, (1024, 2048, 4096))))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen)
    print(f"\nweight ({n}, {k}) float32; median of 7 (ms)\n")
    onednn = cpu_linear.onednn_works()
    print("| rows M | F.linear | (W · xᵀ)ᵀ | oneDNN |\n|---|---|---|---|")
    with torch.inference_mode():
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k, generator=gen)
            cells = [
                f"{1e3 * median_time(lambda x=x, p=cpu_linear.PRODUCTS[route]: p(x, weight, None), 7):.1f}"
                if route != "onednn" or onednn
                else "–"
                for route in ("plain", "transposed", "onednn")
            ]
            print(f"| {m} | {' | '.join(cells)} |")
    lm = torch.nn.Module()
    lm.get_output_embeddings = lambda: torch.nn.Linear(k, 4)  # only the head's width and dtype are read
    routes = cpu_linear.routes_for(lm)
    print(f"\nroutes cpu_linear chooses on this machine for a float32 LM {k} wide: {routes.describe()}")


if __name__ == "__main__":
    main()
