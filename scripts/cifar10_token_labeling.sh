#!/usr/bin/env bash
# The full CIFAR-10 token-labeling experiment with our own CLIs only, on one GPU:
#   1. train a teacher (resnet_tiny, class labels)      -> $RUNS/teacher
#   2. annotate dense top-k label maps with it           -> $STORE
#   3. LV-ViT students WITH token labeling, seeds 0 1    -> $RUNS/tl-s{0,1}
#   4. the same students WITHOUT token labeling          -> $RUNS/base-s{0,1}
# Every training piece stops within TIME_LIMIT minutes (--time-limit, resumable); re-running this script
# continues exactly where it stopped and skips finished steps, so it can be run in pieces of < 10 minutes:
#   bash scripts/cifar10_token_labeling.sh [teacher|annotate|students|report|all]
# Students run PARALLEL at a time on the one GPU (default 1: runs side by side would share the GPU and blur
# each one's speed and data wait).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/cifar10}
RUNS=${RUNS:-runs/cifar}
STORE=${STORE:-stores/cifar10-s8-k5}
TIME_LIMIT=${TIME_LIMIT:-8}
SEEDS=${SEEDS:-"0 1"}
PARALLEL=${PARALLEL:-1}
KINDS=${KINDS:-"tl base"}   # which students: tl (token labeling) and/or base (class labels only)
EXTRA=${EXTRA:-}
TL=${TOKENLABEL:-python3 -m tokenlabel}   # the CLI (works from a checkout with PYTHONPATH=.)
step=${1:-all}
cfg=tokenlabel/configs

if [ ! -d "$DATA/train" ]; then
  [ -f data/cifar10-jpg.tar.xz ] || { echo "no $DATA/train and no data/cifar10-jpg.tar.xz to unpack"; exit 2; }
  mkdir -p data && tar -xJf data/cifar10-jpg.tar.xz -C data
fi

finished() {  # a run is finished when summary.csv has one row per configured epoch
  python3 - "$1" <<'PY'
import csv, sys, yaml, pathlib
run = pathlib.Path(sys.argv[1])
try:
    rows = list(csv.DictReader(open(run / "summary.csv")))
    epochs = yaml.safe_load(open(run / "config.yaml"))["epochs"]
except (OSError, KeyError, TypeError):
    sys.exit(1)
sys.exit(0 if len(rows) >= int(epochs) else 1)
PY
}

train_piece() {  # train_piece OUT ARGS...: one resumable piece (no-op when the run is finished)
  local out=$1; shift
  if finished "$out"; then echo "[cifar] $out finished"; return 0; fi
  $TL train --output "$out" --time-limit "$TIME_LIMIT" --resume auto "$@" $EXTRA
}

if [[ $step == teacher || $step == all ]]; then
  train_piece "$RUNS/teacher" --config $cfg/cifar_teacher.yaml --data "$DATA" --seed 0
fi

if [[ $step == annotate || $step == all ]]; then
  finished "$RUNS/teacher" || { echo "[cifar] the teacher is not finished yet: run the teacher step again"; exit 3; }
  [ -f "$STORE/meta.json" ] && python3 -c "import sys; from tokenlabel.dataloading import LabelStore as L; s=L.open(sys.argv[1]); sys.exit(0 if s.num_done == len(s) else 1)" "$STORE" \
    && echo "[cifar] $STORE complete" || \
  $TL annotate --teacher "$RUNS/teacher/best.pt" --ema --data "$DATA/train" --out "$STORE" --size 8 --topk 5 -j 16
  $TL labels info "$STORE"
fi

if [[ $step == students || $step == all ]]; then
  jobs_=()
  for seed in $SEEDS; do
    [[ " $KINDS " == *" tl "* ]] && jobs_+=("$RUNS/tl-s$seed --labels $STORE --seed $seed")
    [[ " $KINDS " == *" base "* ]] && jobs_+=("$RUNS/base-s$seed --seed $seed")
  done
  i=0
  for j in "${jobs_[@]}"; do
    set -- $j
    out=$1; shift
    mkdir -p "$out"
    train_piece "$out" --config $cfg/cifar_student.yaml --data "$DATA" "$@" > "$out.log" 2>&1 &
    i=$((i + 1))
    if (( i % PARALLEL == 0 )); then wait; fi
  done
  wait
  for j in "${jobs_[@]}"; do set -- $j; tail -n 3 "$1.log"; done
fi

if [[ $step == report || $step == all || $step == students ]]; then
  python3 - "$RUNS" <<'PY'
import csv, sys, pathlib
runs = pathlib.Path(sys.argv[1])
# wait%: the host's time in next(); gpu_wait%: the step stream's idle time between steps (CUDA events), the
# share of the training time the GPU spent waiting for data
print(f"{'run':<12} {'epochs':>6} {'top1':>7} {'ema_top1':>8} {'best':>7} {'epoch_s':>8} {'img/s':>8} {'wait%':>6}"
      f" {'gpu_wait%':>9}")
for run in sorted(p for p in runs.iterdir() if (p / "summary.csv").exists()):
    rows = list(csv.DictReader(open(run / "summary.csv")))
    if not rows:
        continue
    last = rows[-1]
    key = "ema_top1" if last.get("ema_top1") not in (None, "") else "top1"
    best = max(float(r[key]) for r in rows)
    f = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else float("nan")
    ep = sum(f(r, "epoch_time_s") for r in rows) / len(rows)
    ips = sum(f(r, "images_per_s") for r in rows) / len(rows)
    wait = 100 * sum(f(r, "data_wait_frac") for r in rows) / len(rows)
    gwait = 100 * sum(f(r, "gpu_data_wait_frac") for r in rows) / len(rows)
    print(f"{run.name:<12} {len(rows):>6} {f(last,'top1'):>7.2f} {f(last,'ema_top1'):>8.2f} {best:>7.2f} {ep:>8.1f}"
          f" {ips:>8.0f} {wait:>6.1f} {gwait:>9.1f}")
PY
fi
