"""Time and peak memory of the forward-mode tangent of one softmax attention call: ``torch.func.jvp`` through
PyTorch's math kernel (``objective.tangent = "jvp_math"``) against the blockwise online-softmax tangent
(``"jvp"``, ``cmkit/objectives/attention_jvp.py``), float32, q/k/v and all three tangents random, (batch, heads, N, D).

Memory: on a GPU the peak of ``torch.cuda.max_memory_allocated`` above what the inputs hold; on the CPU the largest
tensor any op returns (a ``TorchDispatchMode`` counter), which for the math kernel is an N x N matrix. Prints a
markdown table. The math kernel is skipped where its N x N float32 matrices (about six live at once) pass
``--math-limit-gb``.

    OMP_NUM_THREADS=1 python benchmarks/attention_jvp.py              (about a minute on one CPU thread)
    python benchmarks/attention_jvp.py --device cuda --heads 24 --n 1024 4096 16384 32768
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from cmkit.objectives.attention_jvp import BLOCK_SIZE, blockwise_attention


class LargestOutput(TorchDispatchMode):
    """The byte size of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def math_jvp(primals, tangents, block):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(F.scaled_dot_product_attention, primals, tangents)


def blockwise_jvp(primals, tangents, block):
    return torch.func.jvp(lambda q, k, v: blockwise_attention(q, k, v, block_size=block), primals, tangents)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, primals, tangents, block, device, repeats):
    """(median seconds, peak bytes, the tangent)."""
    with torch.no_grad():
        fn(primals, tangents, block)  # warm-up
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, out = fn(primals, tangents, block)
            sync(device)
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            del out
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _, out = fn(primals, tangents, block)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with LargestOutput() as counter:
                _, out = fn(primals, tangents, block)
            peak = counter.largest
    return sorted(times)[len(times) // 2], peak, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=BLOCK_SIZE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--math-limit-gb", type=float, default=4.0)
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    what = "peak allocated above inputs" if device.type == "cuda" else "largest intermediate tensor"
    print(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, batch {args.batch}, "
          f"{args.heads} head(s), D = {args.head_dim}, block {args.block}; memory: {what}\n")
    print("| N | tangent | time (ms) | memory (MiB) | max abs diff vs math |")
    print("|---:|---|---:|---:|---:|")
    g = torch.Generator(device).manual_seed(0)
    for n in args.n:
        shape = (args.batch, args.heads, n, args.head_dim)
        primals = tuple(torch.randn(shape, generator=g, device=device) for _ in range(3))
        tangents = tuple(torch.randn(shape, generator=g, device=device) for _ in range(3))
        repeats = args.repeats if n <= 4096 or device.type == "cuda" else 1
        math_bytes = 6 * args.batch * args.heads * n * n * 4
        want = None
        if math_bytes <= args.math_limit_gb * 2**30:
            t, peak, want = measure(math_jvp, primals, tangents, args.block, device, repeats)
            print(f"| {n} | jvp_math (math kernel) | {t * 1e3:.1f} | {peak / 2**20:.1f} | |", flush=True)
        else:
            print(f"| {n} | jvp_math (math kernel) | skipped (~{math_bytes / 2**30:.0f} GiB) | | |", flush=True)
        t, peak, out = measure(blockwise_jvp, primals, tangents, args.block, device, repeats)
        diff = "" if want is None else f"{(out - want).abs().max().item():.1e}"
        print(f"| {n} | jvp (blockwise) | {t * 1e3:.1f} | {peak / 2**20:.1f} | {diff} |", flush=True)
        del primals, tangents, want, out


if __name__ == "__main__":
    main()
