"""PyTorch's bf16 matmul (cuBLAS) at the FP8 GEMM's shapes, the comparison of tests/gpu.sh.

    python3 benches/torch_matmul.py 4096x7168x16384 128x7168x16384

Each shape is M x N x K: D[M, N] = A[M, K] @ B[N, K]^T, as fp8_gemm computes it. Random
normal inputs; the mean of timed products (CUDA events) after three warm-ups, at least
0.5 s of them.
"""
import sys

import torch


def bench(m: int, n: int, k: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b.T
    torch.cuda.synchronize()
    runs, elapsed = 0, 0.0
    while elapsed < 0.5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b.T
        end.record()
        torch.cuda.synchronize()
        elapsed += start.elapsed_time(end) / 1e3
        runs += 10
    return 2 * m * n * k * runs / elapsed / 1e12


def main() -> None:
    shapes = sys.argv[1:] or ["4096x7168x16384", "128x7168x16384"]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}: bf16 matmul (cuBLAS)")
    for shape in shapes:
        m, n, k = (int(v) for v in shape.split("x"))
        print(f"{shape:>18}  {bench(m, n, k):8.1f} TFLOP/s")


if __name__ == "__main__":
    main()
