# Sourced by the sbatch scripts of slurm/ (not a job on its own). Submit from the repository root:
# the scripts cd to $SLURM_SUBMIT_DIR (or $SSLSTEAL_HOME) and source this file from there.
#
# Knobs (environment, exported at submit time; sbatch passes the environment on):
#   SSLSTEAL_PYTHON           interpreter (default: .venv/bin/python when present, else python3)
#   SSLSTEAL_NPROC            processes per node (default: GPUs on the node, at least 1)
#   SSLSTEAL_ACCELERATE_ARGS  extra arguments for `accelerate launch` (e.g. "--mixed_precision no")
#   SSLSTEAL_PREEMPT_FLAG     the flag file the training loop polls (default <run_dir>/PREEMPT)

sslsteal_setup() {
  cd "${SSLSTEAL_HOME:-${SLURM_SUBMIT_DIR:-.}}"
  if [ -z "${SSLSTEAL_PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then SSLSTEAL_PYTHON=.venv/bin/python; else SSLSTEAL_PYTHON=python3; fi
  fi
  PY=$SSLSTEAL_PYTHON
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # (no `mkdir logs` here: SLURM opens --output before the script runs; a missing folder makes
  # the job fail with Reason=JobLaunchFailure and no log at all — create it before sbatch)
}

sslsteal_gpus() {  # GPUs visible on this node
  local n=0
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then n=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  echo "${n:-0}"
}

# sslsteal_launcher NPROC → sets LAUNCH=(...) for one node. One process runs python directly:
# accelerate's single-process launcher dies on SIGTERM without passing it on, so the trainer
# would be killed before it could checkpoint. Several processes go through `accelerate launch`
# (torch elastic: SIGTERM reaches the workers, with 30 s to finish).
sslsteal_launcher() {
  local nproc=$1
  if [ "$nproc" -gt 1 ]; then
    # a port per job, so two jobs sharing a node do not collide
    LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$nproc" --num_machines 1
            --main_process_port $((20000 + ${SLURM_JOB_ID:-0} % 20000)) ${SSLSTEAL_ACCELERATE_ARGS:-})
  else
    LAUNCH=("$PY")
  fi
}

# sslsteal_preemptible FLAG CMD... — run CMD in the background and wait for it. SIGUSR2 (sent by
# `#SBATCH --signal=B:USR2@secs` before the time limit, or `scancel --signal=USR2 --batch`) reaches
# only this shell, and launchers do not forward it anyway: the trap touches FLAG, which every rank
# polls: they agree, checkpoint, rank 0 requeues the job and they exit with code 3. The command is
# started with USR2 ignored (a launcher killed by USR2 would orphan its workers; the trainer
# installs its own handler). Returns the command's exit status.
sslsteal_preemptible() {
  local flag=$1 child rc
  shift
  mkdir -p "$(dirname "$flag")"
  rm -f "$flag"  # a flag left by the preempted run would stop this one at once
  export SSLSTEAL_PREEMPT_FLAG=$flag
  trap '' USR2
  "$@" &
  child=$!
  trap 'echo "sslsteal: SIGUSR2 at $(date +%T): asking job step to checkpoint ($SSLSTEAL_PREEMPT_FLAG)" >&2; touch "$SSLSTEAL_PREEMPT_FLAG"' USR2
  # SIGTERM is not a preemption warning: SLURM sends it on scancel, at the time limit and when it
  # preempts or requeues the job itself; every process of the step gets it (the trainer saves on
  # it). The flag is not touched — it makes the trainer requeue the job, and a job that requeues
  # itself on SIGTERM could never be cancelled. This shell only keeps waiting for the trainer.
  trap 'echo "sslsteal: SIGTERM at $(date +%T): waiting for the job step to save and exit" >&2' TERM
  while :; do
    rc=0
    wait "$child" || rc=$?
    # `wait` returns >128 when a trapped signal interrupts it; the child may still be running
    if [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
    break
  done
  if [ "$rc" -gt 128 ]; then rc=0; wait "$child" || rc=$?; fi  # the child's own status
  trap - USR2 TERM
  if [ "$rc" = 3 ]; then
    echo "sslsteal: preempted (exit 3): checkpoint saved; rank 0 asked SLURM to requeue the job (see above;" \
         "if it could not, resubmit: the run resumes with --resume auto)" >&2
  fi
  return "$rc"
}
