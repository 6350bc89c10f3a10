#!/usr/bin/env bash
# Reproduce the README's benchmark tables and plots on this machine (results under benchmarks/results/).
#   source .venv/bin/activate && bash benchmarks/run.sh
# S-curve models train here in a few minutes each. Digits models that take longer are trained once by their recipes
# and loaded when present (2-core CPU: runs/digits-cd ~15 min, runs/digits-ict and runs/digits-ct ~11 min each,
# runs/digits-ect ~4 min, runs/tinted-digits-ict ~12 min). The teachers ship in cmkit/assets.
set -euo pipefail
cd "$(dirname "$0")/.."
CMKIT=${CMKIT:-cmkit}
PY=${PY:-python}
R=benchmarks/results

# --- S-curve: teacher + CD (the quickstart), then CT, iCT and ECT, then one table with all of them ---
$CMKIT quickstart --out $R/s_curve --no-progress
T=$R/s_curve/teacher/model
$CMKIT train s_curve-ct --out runs/s_curve-ct --no-progress
$CMKIT train s_curve-ict --out runs/s_curve-ict --no-progress
$CMKIT train s_curve-ect --teacher $T --out runs/s_curve-ect --no-progress
# continuous time: sCT, sCD (from the same teacher) and MeanFlow, a few minutes each
$CMKIT train s_curve-sct --out runs/s_curve-sct --no-progress
$CMKIT distill s_curve-scd --teacher $T --out runs/s_curve-scd --no-progress
$CMKIT train s_curve-meanflow --out runs/s_curve-meanflow --no-progress
$CMKIT bench quality-vs-steps quickstart-cd --teacher $T --no-progress --out $R/s_curve-all \
  --model CD=$R/s_curve/cd/model --model CT=runs/s_curve-ct/model --model iCT=runs/s_curve-ict/model \
  --model ECT=runs/s_curve-ect/model --model sCT=runs/s_curve-sct/model --model sCD=runs/s_curve-scd/model \
  --model MeanFlow=runs/s_curve-meanflow/model

# --- digits: the shipped DDPM teacher against CD, and CT / iCT (no teacher) and ECT (from the teacher) ---
[ -f runs/digits-cd/model/cmkit.json ] || $CMKIT distill recipes/digits-cd.toml --out runs/digits-cd --no-progress
for job in ct ict ect; do
  [ -f runs/digits-$job/model/cmkit.json ] || $CMKIT train recipes/digits-$job.toml --out runs/digits-$job --no-progress
done
[ -f runs/digits-scd/model/cmkit.json ] || $CMKIT distill recipes/digits-scd.toml --out runs/digits-scd --no-progress
[ -f runs/digits-sct/model/cmkit.json ] || $CMKIT train recipes/digits-sct.toml --out runs/digits-sct --no-progress
$CMKIT bench quality-vs-steps recipes/digits-cd.toml --model CD=runs/digits-cd/model --model CT=runs/digits-ct/model \
  --model iCT=runs/digits-ict/model --model ECT=runs/digits-ect/model --model sCD=runs/digits-scd/model \
  --model sCT=runs/digits-sct/model --out $R/digits-cd --no-progress
# ECT beside its own teacher, the shipped EDM digits teacher (no dopri5 reference: the DDPM table has it)
$CMKIT bench quality-vs-steps recipes/digits-ect.toml --model ECT=runs/digits-ect/model --out $R/digits-edm \
  --set 'eval.teacher_nfe=[1,2,4,35,79]' --set eval.dopri5=false --no-progress
$PY benchmarks/editing_digits.py --model runs/digits-cd/model --out $R/editing-digits

# --- colour: a consistency model trained on tinted digits colours held-out luminance images ---
[ -f runs/tinted-digits-ict/model/cmkit.json ] || \
  $CMKIT train recipes/tinted-digits-ict.toml --out runs/tinted-digits-ict --no-progress
$PY benchmarks/colorize_tinted.py --model runs/tinted-digits-ict/model --out $R/colorize-tinted

# --- cost of a training iteration against the floor of its network passes (CD, CT, iCT, ECT) ---
rm -f $R/cost/*.json
for r in digits-cd digits-ct digits-ict digits-ect digits-sct digits-scd; do
  for b in 128 64; do $PY benchmarks/cost.py --recipe $r --batch $b --out $R/cost; done
done
for r in quickstart-cd s_curve-ct s_curve-ict s_curve-ect s_curve-sct s_curve-scd s_curve-meanflow; do $PY benchmarks/cost.py --recipe $r --teacher $T --out $R/cost; done

# --- text-to-image: the shipped tiny teacher (cmkit:tiny-t2i; recipes tiny-t2i-vae + tiny-t2i-unet retrain it in ~40
# min) through diffusers' own pipeline and cmkit's solvers at 1-50 steps with guidance 4, beside its LCM and LCM-LoRA
# at 1-8 steps (trained once when missing). Needs Debian's dataset-fashion-mnist for the data and the scorer.
for job in lcm lcm-lora; do
  [ -f runs/tiny-t2i-$job/model/cmkit.json ] || \
    $CMKIT distill recipes/tiny-t2i-$job.toml --out runs/tiny-t2i-$job --no-progress
done
$CMKIT bench text-to-image --teacher cmkit:tiny-t2i --model LCM=runs/tiny-t2i-lcm/model \
  --model LCM-LoRA=runs/tiny-t2i-lcm-lora/model --out $R/text-to-image --no-progress

# --- the shipped flow teacher (SD3 layout, no T5): solvers from t = 1 and its own pipeline, one seed of 400 ---
# and its few-step students (CD, sCD full and LoRA, rCM; trained once when missing, 5-15 minutes each)
for job in cd cd-lora scd scd-lora rcm rcm-lora; do
  [ -f runs/tiny-sd3-$job/model/cmkit.json ] || \
    $CMKIT distill recipes/tiny-sd3-$job.toml --out runs/tiny-sd3-$job --no-progress
done
$CMKIT bench text-to-image --teacher cmkit:tiny-sd3 --solvers euler,heun,dpmpp_2m --steps 1,2,4,8,25,50 --num 400 \
  --seeds 0 --model CD=runs/tiny-sd3-cd/model --model CD-LoRA=runs/tiny-sd3-cd-lora/model \
  --model sCD=runs/tiny-sd3-scd/model --model sCD-LoRA=runs/tiny-sd3-scd-lora/model --model rCM=runs/tiny-sd3-rcm/model \
  --model rCM-LoRA=runs/tiny-sd3-rcm-lora/model --out $R/text-to-image-sd3 --no-progress
$PY benchmarks/step_floor.py > $R/step-floor/result.json   # each kind's step against its network passes, alone
# sCD of the UNet teacher beside the teacher's best; LCM, rCM and sCD at rCM's settings side by side
[ -f runs/tiny-t2i-scd/model/cmkit.json ] || $CMKIT distill recipes/tiny-t2i-scd.toml --out runs/tiny-t2i-scd --no-progress
$CMKIT bench text-to-image --teacher cmkit:tiny-t2i --solvers dpmpp_2m --steps 4,8,50 --num 400 --seeds 0 \
  --model sCD=runs/tiny-t2i-scd/model --out $R/text-to-image-scd --no-progress
[ -f runs/tiny-t2i-rcm/model/cmkit.json ] || $CMKIT distill recipes/tiny-t2i-rcm.toml --out runs/tiny-t2i-rcm --no-progress
[ -f runs/tiny-t2i-scd-b/model/cmkit.json ] || $CMKIT distill recipes/tiny-t2i-scd.toml --out runs/tiny-t2i-scd-b \
  --set objective.p_mean=0.4 --set train.steps=1500 --set train.lr=5e-5 --no-progress
$CMKIT bench text-to-image --teacher cmkit:tiny-t2i --solvers dpmpp_2m --steps 50 --num 800 --seeds 0,1 \
  --model LCM=runs/tiny-t2i-lcm/model --model sCD=runs/tiny-t2i-scd-b/model --model rCM=runs/tiny-t2i-rcm/model \
  --model-steps 1,2,4,8 --out $R/text-to-image-unet-students --no-progress
$PY benchmarks/sd3_zero_tokens.py > $R/sd3-zero-tokens/result.json   # collapsed zero tokens against the pipeline's
