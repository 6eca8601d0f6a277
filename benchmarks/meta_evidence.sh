#!/usr/bin/env bash
# The meta-learning evidence of README.md ("Measured"): every inner loop on sinusoid
# regression (5- and 10-shot, MLP 40-40) and on digits 5-way (1- and 5-shot, MLP 64-64),
# then the cost of one meta-step against the number of inner steps. Each run is resumable
# (re-running this script skips finished runs and continues killed ones), and
# benchmarks/meta_table.py turns the metrics.json files into the README tables.
#
#   bash benchmarks/meta_evidence.sh [OUT=runs/meta-evidence] [SINE_STEPS=70000] [DIGITS_STEPS=3000]
set -euo pipefail
OUT=${1:-runs/meta-evidence}
SINE_STEPS=${2:-70000}
DIGITS_STEPS=${3:-3000}
PY=${PY:-.venv/bin/python}
NTK=${NTK:-.venv/bin/ntk-dynamics}
run() {  # run NAME ARGS...: one meta-training run into $OUT/NAME
  local name=$1; shift
  if [ -f "$OUT/$name/metrics.json" ] && grep -q '"status": "completed"' "$OUT/$name/metrics.json"; then
    echo "== $name: done"; return
  fi
  echo "== $name"
  # A run that stops (e.g. a non-finite meta-loss) is reported in the table, not fatal here.
  $NTK meta "$@" --out "$OUT/$name" --resume --no-progress || echo "== $name: exit status $?"
}
for k in 5 10; do
  common=(--task sinusoid --k-shot "$k" --meta-steps "$SINE_STEPS" --eval-every $((SINE_STEPS / 7)))
  for s in 1 5 10; do
    run "sine$k-maml$s" "${common[@]}" --inner maml --inner-steps "$s"
    run "sine$k-anil$s" "${common[@]}" --inner anil --inner-steps "$s"
    run "sine$k-ntk_steps$s" "${common[@]}" --inner ntk_steps --inner-steps "$s"
  done
  run "sine$k-ntk_flow100" "${common[@]}" --inner ntk_flow --inner-steps 100
  run "sine$k-ntk_ridge" "${common[@]}" --inner ntk_ridge
done
for k in 1 5; do
  common=(--task digits --n-way 5 --k-shot "$k" --meta-steps "$DIGITS_STEPS" --eval-every $((DIGITS_STEPS / 3)))
  run "digits$k-maml1" "${common[@]}" --inner maml --inner-steps 1
  run "digits$k-maml5" "${common[@]}" --inner maml --inner-steps 5 --inner-lr 0.1
  run "digits$k-anil5" "${common[@]}" --inner anil --inner-steps 5 --inner-lr 0.1
  run "digits$k-ntk_steps5" "${common[@]}" --inner ntk_steps --inner-steps 5 --inner-lr 0.1
  run "digits$k-ntk_flow" "${common[@]}" --inner ntk_flow --inner-steps 10
  run "digits$k-ntk_ridge" "${common[@]}" --inner ntk_ridge
  # The closed forms solve MSE on one-hot targets; a cross-entropy meta-objective on their
  # query predictions aligns meta-training with accuracy.
  run "digits$k-ntk_flow-xent" "${common[@]}" --inner ntk_flow --inner-steps 10 --outer-loss xent
  run "digits$k-ntk_ridge-xent" "${common[@]}" --inner ntk_ridge --outer-loss xent
done
for task in sinusoid digits; do
  [ -f "$OUT/profile-$task/profile.json" ] || \
    $NTK meta --task "$task" --profile --out "$OUT/profile-$task"
done
$PY benchmarks/meta_table.py "$OUT"
