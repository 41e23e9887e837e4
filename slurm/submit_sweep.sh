#!/usr/bin/env bash
# Submit a whole sweep: freeze its rows, then a steal array and a probe array whose task N starts
# when steal task N has succeeded. Run from the repository root.
#
#   slurm/submit_sweep.sh launch/configs/sweep_demo.yaml [sbatch options for both arrays ...]
#   e.g. slurm/submit_sweep.sh launch/configs/sweep_demo.yaml --partition=gpu --gpus-per-node=1 --time=4:00:00
#
# Afterwards: python launch/sweep.py collect <rows.jsonl printed below>
set -euo pipefail
SWEEP=${1:?usage: slurm/submit_sweep.sh SWEEP.yaml [sbatch options ...]}
shift
cd "$(dirname "$0")/.."
PY=${SSLSTEAL_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ROWS=$("$PY" launch/sweep.py expand "$SWEEP" --quiet)
N=$("$PY" launch/sweep.py count "$ROWS")
mkdir -p logs
STEAL=$(sbatch --parsable --array=0-$((N - 1)) "$@" slurm/steal_array.sbatch "$ROWS")
STEAL=${STEAL%%;*}
PROBE=$(sbatch --parsable --array=0-$((N - 1)) --dependency=aftercorr:"$STEAL" "$@" slurm/probe_array.sbatch "$ROWS")
PROBE=${PROBE%%;*}
echo "sweep $SWEEP: $N rows in $ROWS"
echo "steal array $STEAL, probe array $PROBE (logs/sslsteal-sweep-${STEAL}_<row>.out, logs/sslsteal-probe-${PROBE}_<row>.out)"
echo "when done: $PY launch/sweep.py collect $ROWS"
