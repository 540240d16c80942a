"""The machine's matmul peak, fp32 and bf16: the denominator of every MFU figure.

    python benchmarks/gemm_peak.py [--sizes 512 1024 2048] [--seconds 1.0] [--device cpu]

Times square GEMMs (2·n³ FLOPs each) for `--seconds` per size and dtype, with the threads torch
uses here, and prints GFLOP/s per size, the best per dtype, and bf16/fp32. The training
benchmarks call `peak_flops` in their own run, so an MFU is always measured against a peak from
the same machine at the same time (the machines are shared and noisy). Writes JSON to --json
(default runs/bench/gemm_peak.json).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_rate(n: int, dtype: torch.dtype, seconds: float, device: torch.device) -> float:
    """FLOP/s of an n x n x n matmul, best of the timed repetitions after a warm-up."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.matmul(a, b, out=out)  # warm-up
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def peak_flops(
    dtype: str = "fp32",
    device: torch.device | None = None,
    sizes: tuple[int, ...] = (512, 1024, 2048),
    seconds: float = 0.5,
) -> float:
    """The best GEMM FLOP/s over `sizes`: what an MFU is measured against."""
    device = device or torch.device("cpu")
    return max(gemm_rate(n, DTYPES[dtype], seconds, device) for n in sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="runs/bench/gemm_peak.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f"{'n':>6}  {'dtype':>5}  {'GFLOP/s':>9}")
    for name, dtype in DTYPES.items():
        for n in sorted(args.sizes):
            rate = gemm_rate(n, dtype, args.seconds, device)
            rows.append({"n": n, "dtype": name, "gflops": rate / 1e9})
            print(f"{n:>6}  {name:>5}  {rate / 1e9:>9.1f}")
            if 2 * (2 * n) ** 3 / rate > 10 * args.seconds:  # e.g. bf16 without hardware support
                print(
                    f"        {name}: larger sizes skipped (one GEMM would take over "
                    f"{10 * args.seconds:.0f} s)"
                )
                break
    best = {name: max(r["gflops"] for r in rows if r["dtype"] == name) for name in DTYPES}
    print(
        f"peak: fp32 {best['fp32']:.1f} GFLOP/s, bf16 {best['bf16']:.1f} GFLOP/s "
        f"(bf16/fp32 {best['bf16'] / best['fp32']:.2f}) on {machine(device)}"
    )
    write_json(args.json, {"machine": machine(device), "rows": rows, "peak_gflops": best})


if __name__ == "__main__":
    main()
