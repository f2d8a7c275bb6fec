# sourced by the GPU jobs (run from the project root on the device machine, $OUT set by the device tool): a time
# budget (BUDGET seconds from the job's start) shared by the steps, and the machine's description in $OUT/machine.txt
T0=$(date +%s); B=${BUDGET:-560}
left() { echo $(( B - ($(date +%s) - T0) )); }
step() {  # step MAXSECONDS LOGNAME cmd...: runs cmd under the smaller of MAXSECONDS and the time left
  local t=$1 log=$2; shift 2; local l; l=$(left)
  if [ "$l" -lt 25 ]; then echo "SKIPPED (no time): $*" | tee -a "$OUT/$log"; return; fi
  [ "$t" -gt "$l" ] && t=$l
  echo "== $(date -u +%T) [$t s] $*" >> "$OUT/$log"
  timeout "$t" "$@" >> "$OUT/$log" 2>&1; echo "rc=$? after $(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/$log"
}
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project itself, where setup.sh could not pip-install it
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; date -u;
  python -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"; nproc; } > "$OUT/machine.txt" 2>&1
D=data/imagenet-sample-334.tar  # the real JPEGs the loader jobs carry
fed_b() {  # fed_b PROVIDER: the step fed by that loader setting, ${REPS:-600} timed steps, rows into $OUT/b;
  # $FED_RUN: the command that takes bench step's arguments (default `python -m tokenlabel bench step`)
  step 150 fed.txt ${FED_RUN:-python -m tokenlabel bench step} --providers "$1" --data $D --reps ${REPS:-600} \
    --out "$OUT/b" --no-plot
}
