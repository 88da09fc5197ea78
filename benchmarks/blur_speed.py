"""Which Gaussian blur is faster at which image side: matrix products or depthwise convolution.

SSIM's local statistics are five blurred images per channel, and the blur is the bulk of the
SSIM autoencoder's loss. :func:`flawscope.ssim.separable_blur` uses two small matrix
products per image (``A_h @ x @ A_w.T``) up to ``MATRIX_BLUR_MAX_SIDE`` and two depthwise
convolutions above; this prints forward + backward seconds of both at each side, on batches
of 15 channels (five statistics of RGB) holding the same number of pixels, so the sides
compare fairly. Run it with default kernels and with the AVX2 ones to see both CPU types:

    flock /tmp/flawscope-bench.lock python benchmarks/blur_speed.py --threads 1
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        flock /tmp/flawscope-bench.lock python benchmarks/blur_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import flawscope.ssim as ssim


def blur_by(method: str):
    """``separable_blur`` forced onto one path, whatever the side."""
    def blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        saved = ssim.MATRIX_BLUR_MAX_SIDE
        ssim.MATRIX_BLUR_MAX_SIDE = 1 << 30 if method == "matrices" else 0
        try:
            return ssim.separable_blur(x, window)
        finally:
            ssim.MATRIX_BLUR_MAX_SIDE = saved
    return blur


by_matrices, by_convolution = blur_by("matrices"), blur_by("convolution")


def seconds(blur, x: torch.Tensor, window: torch.Tensor, repeats: int) -> float:
    x = x.clone().requires_grad_(True)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        x.grad = None
        start = time.perf_counter()
        blur(x, window).square().mean().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", default="32,64,128,256,512")
    parser.add_argument("--pixels", type=int, default=16 * 256 * 256,
                        help="pixels per channel in each timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    window = ssim.gaussian_window()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown CPU")
    print(f"{cpu}, {args.threads} thread(s), "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| side | batch x 15 channels | convolution s | matrices s | max difference |")
    print("|---|---|---|---|---|")
    for side in (int(s) for s in args.sides.split(",")):
        batch = max(1, args.pixels // (side * side))
        x = torch.rand(batch, 15, side, side, generator=torch.Generator().manual_seed(0))
        diff = float((by_matrices(x, window) - by_convolution(x, window)).abs().max())
        print(f"| {side} | {batch} | {seconds(by_convolution, x, window, args.repeats):.3f} | "
              f"{seconds(by_matrices, x, window, args.repeats):.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
