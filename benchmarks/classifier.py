"""Time `sagan classifier train`'s CNN: seconds per epoch of 60,000 images, by width and channel count.

Trains on a fixed in-memory batch (random pixels, random labels: the cost does not depend on the
content) for a few steps after a warm-up, and extrapolates to an epoch of --images images. Each row
ends with the 1-minute load average (see README.md: trust rows taken at load < 2.5 on 2 cores).

    python benchmarks/classifier.py --widths 16,32 --channels 1,3 --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import load

from sagan_cli.evaluation.classifier import Classifier, ClassifierConfig


def seconds_per_step(channels: int, width: int, batch: int, steps: int, resolution: int) -> float:
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(channels, resolution, 10, width)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    images, labels = torch.randn(batch, channels, resolution, resolution), torch.randint(10, (batch,))
    for i in range(steps + 3):
        if i == 3:
            started = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,32")
    parser.add_argument("--channels", default="1,3")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--images", type=int, default=60000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.resolution}x{args.resolution}")
    print("channels | width | s/step | s/epoch | load")
    for channels in map(int, args.channels.split(",")):
        for width in map(int, args.widths.split(",")):
            step = seconds_per_step(channels, width, args.batch_size, args.steps, args.resolution)
            epoch = step * args.images / args.batch_size
            print(f"{channels} | {width} | {step:.3f} | {epoch:.0f} | {load():.1f}")


if __name__ == "__main__":
    main()
