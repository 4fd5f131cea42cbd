"""Dropout masks: PyTorch's ``bernoulli_`` against loraq's compiled draw of the same bits.

Run (emulating the 2-core CI machine):

    taskset -c 0,1 python benchmarks/dropout_masks.py --threads 2

Draws a keep-mask of a LoRA-sized activation (batch 32 x 128 tokens x 384 features, p = 0.95)
with ``torch.empty(...).bernoulli_(p)`` and with ``loraq.native.bernoulli.bernoulli_mask`` (the
same values from the same generator state; checked below before timing), interleaved round by
round; prints ns per element and the speed ratio. Where PyTorch hands ``bernoulli_`` to MKL
(Intel CPUs) or the kernel does not reproduce it, loraq uses ``bernoulli_`` itself: the script
says so and the ratio is about 1.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import interleaved, machine_line

from loraq.native.bernoulli import bernoulli_mask, exact_kernel_available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--elements", type=int, default=32 * 128 * 384)
    parser.add_argument("--p", type=float, default=0.95, help="keep probability")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"compiled kernel reproduces bernoulli_: {exact_kernel_available()}")
    like = torch.empty(args.elements)
    ours, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(
        bernoulli_mask(like, args.p, ours),
        torch.empty(args.elements, dtype=torch.uint8).bernoulli_(args.p, generator=theirs),
    )
    times = interleaved(
        {
            "torch bernoulli_": lambda: torch.empty(args.elements, dtype=torch.uint8).bernoulli_(
                args.p, generator=theirs
            ),
            "loraq bernoulli_mask": lambda: bernoulli_mask(like, args.p, ours),
        },
        args.rounds,
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, sec in med.items():
        print(f"  {name:<22} {sec * 1e3:8.2f} ms  {sec / args.elements * 1e9:6.2f} ns/element")
    print(f"  loraq masks {med['torch bernoulli_'] / med['loraq bernoulli_mask']:.2f}x faster")
    print(machine_line())


if __name__ == "__main__":
    main()
