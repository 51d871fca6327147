"""One linear layer of the 7B model at every weight format owl2 loads, by the number of rows it is given.

For each row count it times, on one [out, in] layer with bf16 activations: the plain ``F.linear`` on bf16 weights,
oneDNN's prepacked bf16 layer (``CpuPackedLinear``, what ``owl2.load`` gives unquantised models on the CPU), and
for int8 and int4 (group 64) both paths of the weight-only layers: torch's packed kernel and the dequantise-then-GEMM
path. It prints the milliseconds per call, the weight bytes streamed per second for the one-row case, and for each
quantised format the smallest row count at which dequantising wins (the crossover that
``owl2.model.quantize.INT8_KERNEL_MAX_ROWS`` / ``INT4_KERNEL_MAX_ROWS`` encode).

    python benchmarks/quantized_layers.py [--shape 11008 4096] [--rows 1 4 8 16 32 64 128 256] [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from owl2.model.quantize import CpuPackedLinear, DequantWorkspace, WeightOnlyInt4Linear, WeightOnlyInt8Linear


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], metavar=("OUT", "IN"),
                        help="the layer (default: the 7B's MLP up/gate projection)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    out_features, in_features = args.shape
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).requires_grad_(False)
    workspace = DequantWorkspace()
    packed = CpuPackedLinear(linear)
    int8 = WeightOnlyInt8Linear.from_linear(linear, workspace)
    int4 = WeightOnlyInt4Linear.from_linear(linear, 64, workspace)
    weight = linear.weight
    int4_kernel = int4._kernel_weight()
    cases: dict[str, Callable[[torch.Tensor], object]] = {
        "bf16 F.linear": lambda x: F.linear(x, weight),
        "bf16 packed": packed,
        "int8 kernel": lambda x: torch._weight_int8pack_mm(x, int8.qweight, int8.scale.to(x.dtype)),
        "int8 dequant": lambda x: F.linear(x, int8.dequantize(x.dtype, workspace)),
        "int4 kernel": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4_kernel, 64,
                                                                            int4.scales_and_zeros),
        "int4 dequant": lambda x: F.linear(x, int4.dequantize(x.dtype, workspace)),
    }
    weight_bytes = {"bf16 F.linear": 2.0, "bf16 packed": 2.0, "int8 kernel": 1.0, "int4 kernel": 0.5 + 4 / 64}
    print(f"layer [{out_features}, {in_features}], bf16 activations, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ms per call (median of {args.runs})")
    print(f"{'rows':>5} " + " ".join(f"{name:>14}" for name in cases))
    table: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            table[rows] = {name: median_ms(lambda fn=fn, x=x: fn(x), args.runs) for name, fn in cases.items()}
            print(f"{rows:5d} " + " ".join(f"{table[rows][name]:14.2f}" for name in cases))
    first = args.rows[0]
    streamed = ", ".join(f"{name} {out_features * in_features * size / table[first][name] / 1e6:.1f} GB/s"
                         for name, size in weight_bytes.items())
    print(f"weights streamed at {first} row(s): {streamed}")
    for kind in ("int8", "int4"):
        wins = [rows for rows in args.rows if table[rows][f"{kind} dequant"] < table[rows][f"{kind} kernel"]]
        print(f"{kind}: dequantising is faster from {wins[0] if wins else 'none of the'} rows")


if __name__ == "__main__":
    main()
