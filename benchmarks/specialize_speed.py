"""Time of one training step of farm.specialize's late layers (3-4 on frozen 28 x 28 layer-2
activations, forward + backward) per image, in PyTorch's default (NCHW) and channels-last memory
formats, one thread:

    python benchmarks/specialize_speed.py
"""

import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    from farm.models.compact import CompactSpec, build_compact

    torch.set_num_threads(1)
    print(f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| early K | late (K3, K4) | batch | NCHW ms/image | channels-last ms/image |\n|---|---|---|---|---|")
    for k, late in ((10, (32, 8)), (10, (64, 16)), (25, (64, 16))):
        row = []
        for channels_last in (False, True):
            m = build_compact(CompactSpec(filters=(k, k, k, *late), image_size=112), seed=0).train()
            a2 = torch.randn(64, k, 28, 28)
            if channels_last:
                a2, m = a2.contiguous(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
            for i in range(13):
                if i == 3:
                    t = time.perf_counter()
                m.layer_act(4, m.layer_act(3, a2)).sum().backward()
            row.append((time.perf_counter() - t) / 10 / len(a2) * 1e3)
        print(f"| {k} | {late} | 64 | {row[0]:.2f} | {row[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
