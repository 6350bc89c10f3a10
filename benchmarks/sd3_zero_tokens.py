"""What collapsing a T5-less SD3's zero tokens buys: one guided denoiser call of the shipped flow teacher with the
pipeline's own encoding (CLIP tokens + ``max_sequence_length`` zero tokens, 256 by default) against cmkit's default
(the zero tokens cut to one that carries ``log 256`` in every attention logit), side by side in one run, and the
largest difference between the two predictions.

    python benchmarks/sd3_zero_tokens.py [--teacher cmkit:tiny-sd3] [--batch 64] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import cmkit
from cmkit.eval.report import machine_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="cmkit:tiny-sd3")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    teacher = cmkit.load_teacher(args.teacher).eval()
    prompts = ["a red sneaker", "a blue bag", "a white dress", "a green boot"] * (args.batch // 4)
    pe = teacher.prompt_encoder
    pe.collapse_zero_tokens = False
    full = teacher.encode_prompt(prompts, guidance_scale=4.0)
    pe.collapse_zero_tokens = True
    short = teacher.encode_prompt(prompts, guidance_scale=4.0)
    z = torch.randn(len(prompts), *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    parts = {"pipeline encoding": full, "collapsed": short}
    times = {k: [] for k in parts}
    with torch.no_grad():
        diff = float((teacher(z, 1.5, **full) - teacher(z, 1.5, **short)).abs().max())
        for _ in range(args.repeats):  # interleaved rounds: the machine's drift enters both alike
            for name, cond in parts.items():
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    teacher(z, 1.5, **cond)
                times[name].append((time.perf_counter() - t0) / args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"teacher": args.teacher, "batch": len(prompts), "text_tokens": {k: int(c["prompt_embeds"].shape[1])
                                                                           for k, c in parts.items()},
           "seconds_per_guided_call": med, "speedup": med["pipeline encoding"] / med["collapsed"],
           "max_abs_difference": diff, "machine": machine_info()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
