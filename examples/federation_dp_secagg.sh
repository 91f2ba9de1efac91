#!/usr/bin/env bash
# A federation of 4 institutions on a Dirichlet(0.5) split of the digits, under secure
# aggregation and institution-level differential privacy, one rank per institution.
#
#   examples/federation_dp_secagg.sh                 # in a folder of your choice: writes there
#   ROUNDS=3 RANKS=4 examples/federation_dp_secagg.sh
#
# What each step stands for on a real federation: `data partition` plays the institutions'
# own data; `keys new K` runs at institution K (its private key never leaves it); `keys roster`
# runs wherever the public keys are collected, and every institution pins the SHA-256 it prints.
# Then every institution's ranks start together (here: one mpiexec). The root learns only the
# noisy sum of the clipped updates; the run reports epsilon at delta (docs/privacy.md).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MPIFED=${MPIFED:-mpifed}          # e.g. MPIFED=.venv/bin/mpifed from a clone
MPIEXEC=${MPIEXEC:-mpiexec}
ROUNDS=${ROUNDS:-20}
RANKS=${RANKS:-4}                 # one per institution; more ranks train data-parallel inside them

$MPIFED data digits digits --force
$MPIFED data partition digits/train.h5 sites --institutions 4 --scheme dirichlet --alpha 0.5 --force
for k in 0 1 2 3; do
  [ -e "keys/site-$k.key" ] || $MPIFED keys new "$k" keys
done
SHA256=$($MPIFED keys roster keys --institutions 4)
$MPIEXEC -n "$RANKS" $MPIFED train "$HERE/federation_dp_secagg.toml" \
  --set federated.rounds="$ROUNDS" --set federated.keys_roster_sha256="\"$SHA256\""
echo "model: runs/federation/model.h5; epsilon per round: runs/federation/metrics.jsonl"
