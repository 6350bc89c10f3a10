"""The GPU device check (``benchmarks/gpu_check.sh``): training it/s and peak GPU memory of four text-to-image
distillations at the released model sizes, on random weights (nothing is downloaded, ever):

* ``sd15-lcm-lora``: LCM-LoRA of Stable Diffusion 1.5 (its UNet, VAE and CLIP-L; recipes/sd15-lcm-lora.toml);
* ``sd35m-flow-cd-lora``: flow consistency distillation of SD3.5-medium into a LoRA (MMDiT-X transformer, 16-channel
  VAE, CLIP-L and CLIP-G, no T5; recipes/sd35m-flow-cd-lora.toml);
* ``sd35m-scd-jvp`` / ``sd35m-scd-jvp_math``: sCD (``latent_scd_lora``) of the same model, its tangent through
  cmkit's blockwise attention JVP (``objective.tangent = "jvp"``) against the math kernel (``"jvp_math"``).

How: each model is assembled in code at its released config (random init), written as a diffusers pipeline folder,
and distilled by ``cmkit.cli.jobs.run_job`` exactly as ``cmkit distill`` runs it (the folder read back as a
teacher, the latent cache, the objective, the trainer), at micro-batch 1 with gradient checkpointing, bf16 weights
and bf16 mixed precision, on in-memory random caption images of ``--resolution`` px. The trainer logs every step
(``train.log_every = 1``); a log row's ``sec_per_step`` is the wall time of that step and its log, whose loss
reduction waits for the GPU, so each row is one synchronised step. it/s is 1 / the median of the rows after the
first (the warm-up step). Peak memory is ``torch.cuda.max_memory_allocated`` over those timed steps (its counter
reset after the warm-up step's row; the optimiser state, made at the first step, is held throughout). A case whose
training has run ``--case-budget`` seconds stops after the step in progress (at least one timed step), and a case
is skipped when less than a minute of ``--budget`` is left, so the whole check fits the 8 minutes the shell script
allows it on one H100.

``--dry-run``: the same code path on the CPU in float32 with every config shrunk to a tiny size (1-2 layers, small
widths, 32 px), so the script cannot rot; its memory column is the process's peak RSS so far
(``resource.getrusage``), not a GPU figure. The table is printed and written to ``--out/gpu-check.md`` and
``gpu-check.json`` with the device name and the date."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from a hub: every model here is built in code

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red sneaker", "a green bag", "a blue dress", "a photo of a cat", "a yellow hat on a table",
            "a black boot in the snow", "a white cup of coffee", "an orange scarf"]
GPU_TRAIN = ['train.weight_dtype="bfloat16"', 'train.mixed_precision="bf16"']
CPU_TRAIN = ['train.weight_dtype="float32"', 'train.mixed_precision="no"', "train.cpu=true"]
COMMON = ["train.batch_size=1", "train.micro_batch_size=1", "train.gradient_checkpointing=true", "train.log_every=1",
          "train.checkpoint_every=100000", "train.ema_rates=[]", "train.warmup=0", "seed=0"]
SCD = ['objective.kind="latent_scd_lora"', "objective.w_min=4.5", "objective.w_max=4.5", "objective.sample_steps=4",
       "objective.tangent_warmup=0", "objective.lora_rank=64", "objective.lora_alpha=64.0"]
# case -> (model, recipe file or None, the objective's settings)
CASES = {
    "sd15-lcm-lora": ("sd15", "recipes/sd15-lcm-lora.toml", []),
    "sd35m-flow-cd-lora": ("sd35m", "recipes/sd35m-flow-cd-lora.toml", []),
    "sd35m-scd-jvp": ("sd35m", None, [*SCD, 'objective.tangent="jvp"']),
    "sd35m-scd-jvp_math": ("sd35m", None, [*SCD, 'objective.tangent="jvp_math"']),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage and then the error
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU (what the test runs)")
    p.add_argument("--out", default="benchmarks/results/gpu-check", help="folder for gpu-check.md and .json")
    p.add_argument("--steps", type=int, default=6, help="training steps per case: one warm-up, the rest timed")
    p.add_argument("--resolution", type=int, default=None, help="image size in px (default 1024; 32 with --dry-run)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run (default all)")
    p.add_argument("--case-budget", type=float, default=45.0, help="seconds of training per case before it stops")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check; cases past it skip")
    a = p.parse_args(argv)
    a.resolution = a.resolution if a.resolution is not None else (32 if a.dry_run else 1024)
    if a.steps < 2:
        p.error(f"--steps must be >= 2 (one warm-up step and at least one timed), got {a.steps}")
    if a.resolution < 16 or a.resolution % 16:
        p.error(f"--resolution must be a positive multiple of 16 (the VAE's 8 times the patch size 2), got "
                f"{a.resolution}")
    if not (a.case_budget > 0 and a.budget > 0):
        p.error("--case-budget and --budget must be > 0 seconds")
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in a.cases if c not in CASES]
    if unknown or not a.cases:
        p.error(f"unknown case {unknown[0] if unknown else '(none given)'!r}; choose from {', '.join(CASES)}")
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here; the check needs one GPU (use --dry-run to run it on the CPU)")
    return a


# ----------------------------------------------------------------------------------------------- the models
def clip_encoder(vocab: int, hidden: int, inter: int, layers: int, heads: int, proj: int | None, act: str):
    """A CLIP text encoder of the given size whose special tokens are ``build_tokenizer``'s (0 start, 1 end)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, projection_dim=proj or hidden)
    return (CLIPTextModelWithProjection(cfg) if proj else CLIPTextModel(cfg)).eval()


def vae(dry: bool, latent_channels: int, scaling: float, shift: float | None):
    """SD's AutoencoderKL (four levels of 128-512 channels, two layers each: image / 8), or a tiny three-level one
    (image / 4)."""
    from diffusers import AutoencoderKL

    chans, layers, groups = ((16, 16, 16), 1, 8) if dry else ((128, 256, 512, 512), 2, 32)
    sd3 = {} if shift is None else {"shift_factor": shift, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(chans),
                         up_block_types=("UpDecoderBlock2D",) * len(chans), block_out_channels=chans,
                         layers_per_block=layers, latent_channels=latent_channels, norm_num_groups=groups,
                         sample_size=32 if dry else 1024 if shift is not None else 512, scaling_factor=scaling,
                         **sd3).eval()


def sd15(dry: bool):
    """Stable Diffusion 1.5's networks: UNet2DConditionModel (diffusers' defaults are SD 1.5's UNet) over CLIP-L and
    SD's VAE (``sd15_model`` adds PNDM as the release ships it); or the same layout tiny."""
    from diffusers import UNet2DConditionModel

    from cmkit.latent.text_encoders import build_tokenizer

    tok = build_tokenizer(CAPTIONS, max_length=77)
    if dry:
        enc = clip_encoder(len(tok), 32, 64, 1, 2, None, "quick_gelu")
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)
    else:
        enc = clip_encoder(49408, 768, 3072, 12, 12, None, "quick_gelu")
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return unet, vae(dry, 4, 0.18215, None), [enc], [tok]


def sd15_model(unet, autoencoder, encoders, tokenizers):
    from diffusers import PNDMScheduler

    from cmkit.latent.denoiser import TextToImageModel
    from cmkit.latent.families.unet import LatentDenoiser, PromptEncoder

    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                          skip_prk_steps=True, steps_offset=1)
    return TextToImageModel(LatentDenoiser(unet, sched), autoencoder, PromptEncoder(encoders, tokenizers).eval(),
                            {"force_zeros_for_empty_prompt": False})


def sd35m(dry: bool):
    """SD3.5-medium's networks without T5: SD3Transformer2DModel (MMDiT-X: dual attention in the first 13 blocks, RMS
    q/k norm), CLIP-L and CLIP-G with projection, the 16-channel VAE (``sd35m_model`` adds
    FlowMatchEulerDiscreteScheduler(shift=3)); or the same layout tiny."""
    from diffusers import SD3Transformer2DModel

    from cmkit.latent.text_encoders import build_tokenizer

    toks = [build_tokenizer(CAPTIONS, max_length=77) for _ in range(2)]
    if dry:
        encs = [clip_encoder(len(toks[0]), 32, 64, 1, 2, 16, "quick_gelu"),
                clip_encoder(len(toks[1]), 32, 64, 1, 2, 16, "gelu")]
        tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
                                   pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
                                   dual_attention_layers=(0,), qk_norm="rms_norm")
    else:
        encs = [clip_encoder(49408, 768, 3072, 12, 12, 768, "quick_gelu"),
                clip_encoder(49408, 1280, 5120, 32, 20, 1280, "gelu")]
        tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return tr, vae(dry, 16, 1.5305, 0.0609), encs, toks


def sd35m_model(transformer, autoencoder, encoders, tokenizers):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cmkit.latent.denoiser import TextToImageModel
    from cmkit.latent.families.sd3 import SD3Denoiser, SD3PromptEncoder

    prompts = SD3PromptEncoder([*encoders, None], [*tokenizers, None], transformer.config.joint_attention_dim).eval()
    return TextToImageModel(SD3Denoiser(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0)), autoencoder,
                            prompts, {"pipeline": "StableDiffusion3Pipeline"})


def write_teacher(name: str, folder: Path, dry: bool) -> Path:
    """The model ``name`` built (random init: on the GPU and then in bf16 outside a dry run, which is quick) and
    written as a diffusers pipeline folder."""
    torch.manual_seed(0)
    with torch.device("cpu" if dry else "cuda"):  # the networks only: the wrappers' own tensors stay on the CPU
        net, autoencoder, encoders, tokenizers = MODELS[name][0](dry)
    half = torch.float32 if dry else torch.bfloat16  # the network and text encoders as a bf16 release holds them
    net, autoencoder = net.to("cpu", half), autoencoder.to("cpu")
    encoders = [e.to("cpu", half) for e in encoders]
    MODELS[name][1](net, autoencoder, encoders, tokenizers).save_pretrained(folder)
    del net, autoencoder, encoders
    free()
    return folder


MODELS = {"sd15": (sd15, sd15_model), "sd35m": (sd35m, sd35m_model)}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- a case
def captions(resolution: int):
    """8 random caption images of ``resolution`` px to train on (2 held out), in memory."""
    from cmkit.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 3, resolution, resolution, generator=g) * 2 - 1
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(10)]
    return Dataset("gpu-check-captions", x[:8], x[8:], train_captions=caps[:8], test_captions=caps[8:])


@contextmanager
def watched_steps(budget_s: float, cuda: bool):
    """While a case trains: the peak GPU memory counter reset after the warm-up step's log row and read after each
    later one; the run stopped after the step in progress once it has trained ``budget_s`` seconds (the trainer's
    own stop, as SIGTERM asks for it, never before the first timed step)."""
    from cmkit.training.trainer import Trainer

    seen = {"peak": None, "stopped_at": None}
    log = Trainer.log

    def watching(self, since_step, since_time, started):
        loss = log(self, since_step, since_time, started)
        if cuda and self.step_no == 1:
            torch.cuda.reset_peak_memory_stats()
        elif cuda:
            seen["peak"] = torch.cuda.max_memory_allocated()
        if self.step_no >= 2 and time.perf_counter() - started > budget_s and self._stop is not None:
            self._stop.flag = True
            seen["stopped_at"] = self.step_no
        return loss

    Trainer.log = watching
    try:
        yield seen
    finally:
        Trainer.log = log


def run_case(case: str, teacher: Path, work: Path, a: argparse.Namespace) -> dict:
    from cmkit.cli.jobs import run_job
    from cmkit.cli.recipes import load_recipe
    from cmkit.training.stop import TrainingInterrupted

    _, recipe_file, sets = CASES[case]
    sets = [*sets, *COMMON, *(CPU_TRAIN if a.dry_run else GPU_TRAIN), f"train.steps={a.steps}",
            f"data.image_size={a.resolution}"]
    if a.dry_run:  # a small adapter for the tiny networks
        sets += ["objective.lora_rank=4", "objective.lora_alpha=4.0"]
    recipe = load_recipe(ROOT / recipe_file if recipe_file else None, sets)
    out = work / "runs" / case
    t0 = time.perf_counter()
    note = ""
    with watched_steps(a.case_budget, not a.dry_run) as seen:
        try:
            run_job("distill", recipe, out, str(teacher), progress=False, data=captions(a.resolution))
        except TrainingInterrupted:
            pass
    if seen["stopped_at"] is not None:
        stop = f"stopped at step {seen['stopped_at']} of {a.steps} (--case-budget {a.case_budget:g} s)"
        note = f"{note}; {stop}" if note else stop
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines() if r.strip()]
    timed = [r["sec_per_step"] for r in rows if r["step"] >= 2]
    if not timed:
        raise RuntimeError(f"{case}: no timed step in {out / 'log.jsonl'}")
    sec = statistics.median(timed)
    if a.dry_run:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "peak RSS of the process so far"
    else:
        peak, kind = seen["peak"] / 1e9, "torch.cuda.max_memory_allocated over the timed steps"
    losses = [r["loss"] for r in rows]
    if any(v is None or not math.isfinite(v) for v in losses):
        note = "; ".join(filter(None, [note, "non-finite loss (random weights; timing still holds)"]))
    return {"case": case, "resolution": a.resolution, "it_per_s": 1.0 / sec, "sec_per_step": sec,
            "timed_steps": len(timed), "peak_memory_gb": peak, "memory": kind,
            "case_seconds": time.perf_counter() - t0, "note": note}


# ----------------------------------------------------------------------------------------------- the report
def table(results: list[dict], dry: bool) -> str:
    results = [{**r, "note": r["note"].replace("|", "/")} for r in results]
    mem = "peak RSS GB (CPU process, so far)" if dry else "peak GPU memory GB"
    lines = [f"| case | resolution | it/s | {mem} | timed steps | case s | note |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "it_per_s" not in r:
            lines.append(f"| {r['case']} | {r['resolution']} | - | - | 0 | - | {r['note']} |")
            continue
        lines.append(f"| {r['case']} | {r['resolution']} | {r['it_per_s']:.3g} | {r['peak_memory_gb']:.2f} | "
                     f"{r['timed_steps']} | {r['case_seconds']:.0f} | {r['note']} |")
    return "\n".join(lines)


def report(out: Path, a: argparse.Namespace, device: str, results: list[dict], seconds: float) -> str:
    """gpu-check.md and gpu-check.json in ``out`` (rewritten after every case, so a check cut short keeps the cases
    it finished); returns the markdown."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    md = (f"# GPU device check\n\n{device}, {date}; {a.steps} steps per case (the first a warm-up), batch 1, "
          f"{'float32 on the CPU, tiny configs' if a.dry_run else 'bf16 weights and mixed precision'}, gradient "
          f"checkpointing; {seconds:.0f} s in all.\n\n{table(results, a.dry_run)}\n")
    (out / "gpu-check.md").write_text(md)
    (out / "gpu-check.json").write_text(json.dumps({"device": device, "date": date, "dry_run": a.dry_run,
                                                    "steps": a.steps, "seconds": seconds, "results": results},
                                                   indent=2) + "\n")
    return md


def main(argv=None) -> int:
    a = parse_args(argv)
    started = time.perf_counter()
    if a.dry_run:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = (f"CPU dry run ({platform.processor() or platform.machine()})" if a.dry_run
              else torch.cuda.get_device_name())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CMKIT_CACHE", str(work / "cache"))
        teachers: dict[str, Path] = {}
        for case in a.cases:
            left = a.budget - (time.perf_counter() - started)
            if left < 60 and results:
                results.append({"case": case, "resolution": a.resolution,
                                "note": f"skipped: {left:.0f} s of --budget {a.budget:g} s left"})
                continue
            name = CASES[case][0]
            held = torch.cuda.memory_allocated() / 1e9 if not a.dry_run else None
            try:
                if name not in teachers:
                    t = time.perf_counter()
                    teachers[name] = write_teacher(name, work / "teachers" / name, a.dry_run)
                    print(f"[gpu-check] {name}: random-weight pipeline folder written in "
                          f"{time.perf_counter() - t:.0f} s", flush=True)
                if not a.dry_run:
                    torch.cuda.reset_peak_memory_stats()
                r = run_case(case, teachers[name], work, a)
                r["gpu_gb_held_before"] = held  # what an earlier case left allocated (a leak shows here)
                print(f"[gpu-check] {case}: {r['it_per_s']:.3g} it/s, {r['peak_memory_gb']:.2f} GB ({r['memory']}), "
                      f"{r['case_seconds']:.0f} s {r['note']}", flush=True)
            except Exception as e:  # one case failing keeps the others' figures; the exit code says it failed
                failed = True
                first = (str(e).strip().splitlines() or [""])[0][:300]
                r = {"case": case, "resolution": a.resolution, "note": f"failed: {type(e).__name__}: {first}"}
                print(f"[gpu-check] {case}: {r['note']}", file=sys.stderr, flush=True)
            results.append(r)
            report(out, a, device, results, time.perf_counter() - started)
            free()
    print(report(out, a, device, results, time.perf_counter() - started), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
