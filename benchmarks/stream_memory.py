"""Peak resident memory and step time of text-to-image runs on streamed shards with the on-disk latent cache, beside
today's in-memory path, each run a fresh process measured alone (peak RSS from the kernel's rusage of that child):

  1. the tiny LCM recipe on coloured Fashion-MNIST held in memory (data.name) against the same 48,000 images as
     webdataset shards (data.path), one thread each, as the issue's diffusers-script comparison ran (1.1 GB);
  2. a short LCM-LoRA run on 20,000- and 200,000-image shard sets: the cache built once (a second run encodes
     nothing), and a build killed with SIGKILL part-way resumed without re-encoding its finished shards.

    python benchmarks/stream_memory.py --out benchmarks/results/stream-memory   (about 30 minutes on 2 cores)"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "stream-memory"


def measure(cmd: list[str], env: dict, kill_when=None) -> dict:
    """Run ``cmd``; its peak RSS (MB, the kernel's rusage of this child alone), wall time, exit code and output.
    ``kill_when()`` is polled: SIGKILL once it holds."""
    t0, killed = time.perf_counter(), False
    logs = RUNS / "last-command"
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if kill_when is not None and not killed and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t0, "rc": proc.returncode,
            "killed": killed, "stderr": logs.with_suffix(".err").read_text()[-5000:]}


def sec_per_step(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "sec_per_step" in r]
    return rows[-1]["sec_per_step"]  # the last row: past the first steps' warm-up


def distill(recipe: str, out: Path, sets: list[str], env: dict, **kw) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cmkit", "distill", recipe, "--out", str(out), "--no-progress",
           *[f"--set={s}" for s in sets]]
    return measure(cmd, env, **kw)


def encoded(err: str) -> int:
    """Shards the run encoded, from its one-line note (0 when it read everything from the cache)."""
    m = re.search(r"encoding (\d+) of the (\d+) shard", err)
    return int(m.group(1)) if m else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stream-memory")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", choices=["lcm", "lora"], help="one part (each writes its own result file)")
    a = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    shards = {n: RUNS / f"shards-{n // 1000}k" for n in (48000, 20000, 200000)}
    for n, folder in shards.items():
        if not (folder / "done").is_file():
            subprocess.run([sys.executable, str(ROOT / "benchmarks/caption_shards.py"), "--num", str(n), "--out",
                            str(folder)], check=True)
            (folder / "done").write_text("")
    cache = RUNS / "cache"
    env = {**os.environ, "CMKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    steps = [f"train.steps={a.steps}", f"train.log_every={a.steps // 2}", f"train.checkpoint_every={a.steps}"]
    shard_data = ["data.image_size=32", 'data.name=""']
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "threads": 1, "steps": a.steps}

    # 1. the tiny LCM: in memory against streamed shards of the same images
    if a.only != "lora":
        result["lcm"] = lcm_part(steps, shards, cache, env, shard_data)
    if a.only != "lcm":
        result["lcm_lora"] = lora_part(steps, shards, cache, env, shard_data)
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"result-{a.only}.json" if a.only else "result.json"
    (a.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def lcm_part(steps, shards, cache, env, shard_data) -> dict:
    in_ram = distill("tiny-t2i-lcm", RUNS / "lcm-ram", steps, env)
    shutil.rmtree(cache, ignore_errors=True)
    build = distill("tiny-t2i-lcm", RUNS / "lcm-shards", [*steps, *shard_data, f'data.path="{shards[48000]}"'], env)
    warm = distill("tiny-t2i-lcm", RUNS / "lcm-shards", [*steps, *shard_data, f'data.path="{shards[48000]}"'], env)
    pairs = step_pairs(steps, shards, env, shard_data)
    return {
        "step_pairs": pairs,
        "in_memory": {"peak_rss_mb": in_ram["peak_rss_mb"], "sec_per_step": sec_per_step(RUNS / "lcm-ram")},
        "shards_first_run": {"peak_rss_mb": build["peak_rss_mb"], "seconds": build["seconds"],
                             "encoded_shards": encoded(build["stderr"])},
        "shards_cached": {"peak_rss_mb": warm["peak_rss_mb"], "sec_per_step": sec_per_step(RUNS / "lcm-shards"),
                          "encoded_shards": encoded(warm["stderr"])},
        "diffusers_script_peak_rss_mb": 1100, "diffusers_script_note": "measured in the issue, not rerun here"}


def step_pairs(steps, shards, env, shard_data, pairs: int = 3) -> dict:
    """Seconds per step of the in-memory and the cached-shard runs, alternated ``pairs`` times (both sets already
    cached, so only training is timed), and the median of each: one pair alone is within the machine's noise."""
    times = {"in_memory": [], "shards_cached": []}
    for _ in range(pairs):
        distill("tiny-t2i-lcm", RUNS / "pair-ram", steps, env)
        times["in_memory"].append(sec_per_step(RUNS / "pair-ram"))
        distill("tiny-t2i-lcm", RUNS / "pair-shards", [*steps, *shard_data, f'data.path="{shards[48000]}"'], env)
        times["shards_cached"].append(sec_per_step(RUNS / "pair-shards"))
    out = {k: {"sec_per_step": v, "median": sorted(v)[len(v) // 2]} for k, v in times.items()}
    out["ratio_of_medians"] = out["shards_cached"]["median"] / out["in_memory"]["median"]
    return out


def lora_part(steps, shards, cache, env, shard_data) -> dict:
    # 2. LCM-LoRA on 20k and 200k shard sets: cold build, a killed build resumed, a second run encoding nothing
    lora = {}
    for n in (20000, 200000):
        data = [*steps, *shard_data, f'data.path="{shards[n]}"']
        shutil.rmtree(cache, ignore_errors=True)
        n_shards = len(list(shards[n].glob("*.tar")))
        row = {"images": n, "shards": n_shards}
        if n == 200000:  # SIGKILL once a quarter of the shards are in the cache
            def cached() -> int:
                return len(list((cache / "latents").glob("*.safetensors")))
            quarter = n_shards // 4
            killed = distill("tiny-t2i-lcm-lora", RUNS / f"lora-{n}", data, env,
                             kill_when=lambda: (cache / "latents").is_dir() and cached() >= quarter)  # noqa: B023
            row["killed_with_cached_shards"] = cached()
            row["killed"] = killed["killed"]
        first = distill("tiny-t2i-lcm-lora", RUNS / f"lora-{n}", data, env)
        second = distill("tiny-t2i-lcm-lora", RUNS / f"lora-{n}", data, env)
        row.update(first_peak_rss_mb=first["peak_rss_mb"], first_seconds=first["seconds"],
                   first_encoded_shards=encoded(first["stderr"]), second_peak_rss_mb=second["peak_rss_mb"],
                   second_encoded_shards=encoded(second["stderr"]),
                   sec_per_step=sec_per_step(RUNS / f"lora-{n}"), rc=[first["rc"], second["rc"]])
        lora[n] = row
    return lora


if __name__ == "__main__":
    main()
