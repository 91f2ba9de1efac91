#!/usr/bin/env bash
# Submit the digits MLP to SLURM on RANKS ranks, wait for the job, print its result.
#
#   examples/slurm/submit.sh                     # from the folder that holds .venv (a clone)
#   RANKS=4 SBATCH_ARGS="--time=00:10:00 --partition=debug" examples/slurm/submit.sh
#
# Writes digits/ (once), then `sbatch --wait -n RANKS jobs/train.sbatch examples/slurm/digits.toml`.
# The job's output folder is runs/mpifed-<job id>/ (the config names no run.out) and its log
# slurm-mpifed-<job id>.out; jobs/train.sbatch says how to set modules and the venv for a site.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
MPIFED=${MPIFED:-mpifed}
RANKS=${RANKS:-2}
[ -e digits/test.h5 ] || $MPIFED data digits digits
# shellcheck disable=SC2086  # SBATCH_ARGS holds several options on purpose
JOB=$(sbatch --parsable --wait -n "$RANKS" ${SBATCH_ARGS:-} "$REPO/jobs/train.sbatch" \
      "$REPO/examples/slurm/digits.toml")
JOB=${JOB%%;*}                  # --parsable prints "id" or "id;cluster"
echo "job $JOB done; log slurm-mpifed-$JOB.out:"
tail -n 3 "slurm-mpifed-$JOB.out"
$MPIFED evaluate "runs/mpifed-$JOB/model.h5" digits/test.h5
