"""Crossover of spectral DSGD's two exact-enough paths, per block shape and device: the scores of a
stack of same-shape blocks by the certified matmul path (``polar_directions``: Polar-Express
iteration, certificate, ``⟨G, D⟩``) against the exact path, in both modes of the step:

* one layer moves (certified greedy): ``svdvals`` of every block, and the ``svd`` of the one block
  moved, counted once per step as ``svd / layers``;
* every layer moves (estimated constants): one ``svd`` of every block (``U Vᵀ`` for each step).

    python -m benchmarks.bench_polar --threads 1            # the table behind POLAR_MIN_SIDE["cpu"]
    python -m benchmarks.bench_polar --device cuda          # the same on a GPU (then update "cuda")

Calls alternate (polar, exact) and the median of the repeats is printed with the ratio; the
tightness ``c / ‖G‖_*`` of the matmul path is printed beside it.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_common import interleaved, make_device, median
from lightning_dsgd.geometry import SpectralGeometry
from lightning_dsgd.polar import polar_directions

#: (rows, columns, blocks of that shape): the augmented blocks of MLP and transformer layers.
SHAPES = [
    (64, 65, 4),
    (128, 129, 4),
    (128, 513, 2),
    (256, 257, 4),
    (1024, 257, 2),
    (256, 1025, 2),
    (512, 513, 4),
    (2048, 513, 2),
    (512, 2049, 2),
    (1024, 1025, 2),
]


def crossover(device_name: str, layers: int, warmup: int, repeats: int) -> list[str]:
    device = make_device(device_name)
    dev = device.torch_device
    lines = [
        "| block | blocks | matmul path, ms | exact, one layer moves, ms | ratio | exact, every layer moves, ms "
        "| ratio | tightness c/‖G‖_* (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    exact_geometry, polar_geometry = SpectralGeometry(polar="never"), SpectralGeometry(polar="always")
    for m, n, count in SHAPES:
        stack = torch.randn(count, m, n, device=dev) @ torch.diag_embed(torch.rand(count, n, device=dev)) / n
        grads = [(stack[j, :, :-1], stack[j, :, -1]) for j in range(count)]

        calls = [
            lambda g=grads: polar_geometry.dual_norms_and_bases(g),
            lambda g=grads: exact_geometry.dual_norms_and_bases(g),
            lambda s=stack: exact_geometry.duality_map(s[0]),
            lambda g=grads: exact_geometry.dual_norms_and_bases(g, directions=True),
        ]
        times = interleaved(calls, [lambda: None] * len(calls), device, warmup, repeats)
        t_polar, t_exact = median(times[0]), median(times[1]) + median(times[2]) * count / layers
        t_all = median(times[3])
        _, inner, _ = polar_directions(stack)
        tight = (inner.double() / torch.linalg.svdvals(stack.double()).sum(-1)).min().item()
        lines.append(
            f"| {m} × {n} | {count} | {t_polar * 1e3:.2f} | {t_exact * 1e3:.2f} | {t_polar / t_exact:.2f} "
            f"| {t_all * 1e3:.2f} | {t_polar / t_all:.2f} | {tight:.4f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24, help="spectral blocks per model (one svd per step)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    crossover(args.device, args.layers, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
