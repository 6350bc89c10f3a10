"""Issue 31, the hangs: a process-group set-up that cannot complete (a stale ``WORLD_SIZE``) says so in one line and
stops within a minute, obeying SIGTERM meanwhile; a stop signal is acknowledged at once and cuts validation images
short; ``accelerate launch --use_fsdp`` is refused in one line. Every case runs ``python -m cmkit`` for real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import lcm_lora_folders

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_FSDP", "CMKIT_SETUP_TIMEOUT")
BASE_ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("FSDP_")},
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
TRAIN = [sys.executable, "-m", "cmkit", "train", "s_curve-ict", "--no-progress",
         *[a for kv in ("train.cpu=true", "train.steps=2", "train.batch_size=8", "eval.schedule_max_steps=0")
           for a in ("--set", kv)]]
LIMIT = 180  # s for four start-ups side by side on a busy machine (about 10 s on an idle one)
# what `accelerate launch --use_fsdp` puts in each process's environment (accelerate 1.x, its defaults)
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
            "FSDP_OFFLOAD_PARAMS": "false", "FSDP_MIN_NUM_PARAMS": "100000000", "FSDP_SYNC_MODULE_STATES": "true",
            "FSDP_USE_ORIG_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_FORWARD_PREFETCH": "false",
            "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def _start(tmp: Path, name: str, env: dict) -> tuple[subprocess.Popen, Path]:
    err = tmp / f"{name}.err"
    with open(err, "w") as f:
        p = subprocess.Popen([*TRAIN, "--out", str(tmp / name)], env={**BASE_ENV, **env}, stdout=f, stderr=f)
    return p, err


def _finish(p: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None when it was still running ``timeout`` s on (then it is killed: not left running)."""
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None


def _ports(n: int) -> list[str]:
    """``n`` different TCP ports nothing listens on (held open together, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: str) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", int(port))) == 0


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Four runs started side by side (each start-up costs seconds): a stale WORLD_SIZE with no MASTER_ADDR, one whose
    MASTER_ADDR nobody listens on (a 3 s set-up limit), one sent SIGTERM while it waits for its peer, and one under
    accelerate launch --use_fsdp's environment. Each: (exit code, stderr, seconds it took from its cue)."""
    tmp = tmp_path_factory.mktemp("launches")
    stale = {"WORLD_SIZE": "2", "RANK": "0"}
    nobody, port = _ports(2)
    lonely = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": nobody,
              "CMKIT_SETUP_TIMEOUT": "3"}
    waiting = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    runs = {name: _start(tmp, name, env) for name, env in
            (("stale", stale), ("lonely", lonely), ("waiting", waiting), ("fsdp", FSDP_ENV))}
    t0 = time.monotonic()
    p = runs["waiting"][0]
    while p.poll() is None and not _listening(port) and time.monotonic() - t0 < LIMIT:
        time.sleep(0.05)  # rank 0 listens for its peer: the set-up is under way
    time.sleep(0.5)
    cue = time.monotonic()
    p.send_signal(signal.SIGTERM)
    codes = {"waiting": (_finish(p, 10), time.monotonic() - cue)}
    for name, (q, _) in runs.items():
        if name != "waiting":
            codes[name] = (_finish(q, max(1.0, LIMIT - (time.monotonic() - t0))), time.monotonic() - t0)
    return {name: (code, runs[name][1].read_text(), seconds) for name, (code, seconds) in codes.items()}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("cmkit:")]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err[-3000:]
    return lines[0]


def test_a_stale_world_size_with_no_master_addr_is_refused_at_once_naming_the_fix(launches):
    code, err, _ = launches["stale"]
    line = _one_line(err)
    assert code == 2, err[-3000:]
    assert "WORLD_SIZE=2" in line and "unset WORLD_SIZE" in line and "torchrun" in line, line


def test_a_set_up_whose_peers_never_come_says_so_within_its_limit(launches):
    code, err, seconds = launches["lonely"]
    assert code == 2, f"exit {code} after {seconds:.0f} s: {err[-3000:]}"
    line = _one_line(err)
    assert "did not meet within 3 s" in line and "unset WORLD_SIZE" in line and "torchrun" in line, line


def test_sigterm_stops_a_run_waiting_for_its_peers(launches):
    code, err, seconds = launches["waiting"]
    assert code == 130, f"exit {code} {seconds:.1f} s after SIGTERM: {err[-3000:]}"
    assert seconds < 5 and "SIGTERM" in _one_line(err), err[-3000:]


def test_accelerate_launch_use_fsdp_is_refused_in_one_line_naming_the_option_and_the_fix(launches):
    code, err, _ = launches["fsdp"]
    line = _one_line(err)
    assert code == 2 and "--use_fsdp" in line and "train.fsdp = true" in line, line


def test_the_stale_launch_check_leaves_real_launches_alone():
    from cmkit.core.processes import stale_launch

    assert stale_launch({"WORLD_SIZE": "2", "RANK": "0"})
    assert stale_launch({"WORLD_SIZE": "1"}) is None and stale_launch({}) is None
    for launched in ({"LOCAL_RANK": "0"}, {"TORCHELASTIC_RUN_ID": "x"}, {"MASTER_ADDR": "10.0.0.1"},
                     {"OMPI_COMM_WORLD_LOCAL_RANK": "0"}):
        assert stale_launch({"WORLD_SIZE": "2", **launched}) is None, launched
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a number of processes"):
        stale_launch({"WORLD_SIZE": "two"})


def test_sigint_during_validation_is_acknowledged_at_once_and_cuts_the_images_short(tmp_path):
    """2000 validation prompts take seconds to draw; SIGINT sent while they are drawn is answered with a line at
    once, the grid is abandoned at the next network call, and the run checkpoints its step and exits 130."""
    root = lcm_lora_folders(tmp_path, 8)
    prompts = "[" + ",".join(f'"a red bag {i}"' for i in range(2000)) + "]"
    sets = [f'data.path="{root / "data"}"', "train.steps=1000", "train.batch_size=2", "train.log_every=2",
            "train.checkpoint_every=100000", "train.warmup=0", "objective.lora_rank=2", "objective.lora_alpha=2.0",
            "eval.schedule_max_steps=0", "train.validate_every=2", f"train.validation_prompts={prompts}"]
    out, err = tmp_path / "run", tmp_path / "err"
    cmd = [sys.executable, "-m", "cmkit", "distill", "tiny-t2i-lcm-lora", "--teacher", str(root / "teacher"),
           "--out", str(out), "--no-progress", *[a for kv in sets for a in ("--set", kv)]]
    with open(err, "w") as f:
        p = subprocess.Popen(cmd, env={**BASE_ENV, "CMKIT_CACHE": str(tmp_path / "cache")}, stdout=f, stderr=f)
    deadline = time.monotonic() + 120
    while p.poll() is None and not (out / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)  # the row of step 2 is written just before its validation images are drawn
    assert p.poll() is None, err.read_text()[-3000:]
    time.sleep(0.3)
    cue = time.monotonic()
    p.send_signal(signal.SIGINT)
    while "SIGINT received" not in err.read_text() and time.monotonic() - cue < 3:
        time.sleep(0.02)
    acknowledged = time.monotonic() - cue
    code, stopped = _finish(p, 15), time.monotonic() - cue
    text = err.read_text()
    assert acknowledged < 2, f"no acknowledgement {acknowledged:.1f} s after SIGINT: {text[-3000:]}"
    assert code == 130 and stopped < 8, f"exit {code} {stopped:.1f} s after SIGINT: {text[-3000:]}"
    assert "cut short" in text and not (out / "validation" / "step-00000002.png").exists(), text[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
