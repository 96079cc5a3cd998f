"""Cost of sLCT's exact minibatch OT pairing per batch (scipy linear_sum_assignment on a B x B squared-L2 cost).

    python benchmarks/bench_ot.py
"""
import time

import torch

from gensample.methods.ot import ot_noise_permutation
def main() -> None:
    torch.set_num_threads(1)
    print("| latent shape | B | ms per batch (median of 7) |")
    print("|---|---|---|")
    for shape in ((4, 32, 32), (4, 8, 8)):
        for b in (64, 128, 256):
            data, noise = torch.randn(b, *shape), torch.randn(b, *shape)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                ot_noise_permutation(data, noise)
                times.append(time.perf_counter() - t0)
            print(f"| {'x'.join(map(str, shape))} | {b} | {sorted(times)[3] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
