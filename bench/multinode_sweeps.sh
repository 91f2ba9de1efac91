#!/usr/bin/env bash
# The all-reduce sweeps across emulated nodes (TCP over loopback between nodes, shared memory
# inside one) and the two-level cost model fitted on 1x2 and 2x1, predicting 2x2 and 4x1.
# Meant for a quiet machine with a core per rank (4 ranks + the TCP stack): on a 2-core box the
# 4-rank configurations are bounded by scheduling, not by the link.
#
#     bench/multinode_sweeps.sh OUT_DIR [PYTHON]        (PYTHON defaults to .venv/bin/python)
#
# Writes OUT_DIR/ar-<nodes>x<ranks per node>-<arrays>.json, heldout.json and the tables on stdout.
set -euo pipefail
out=${1:?usage: bench/multinode_sweeps.sh OUT_DIR [PYTHON]}
py=${2:-.venv/bin/python}
mpiexec=$(dirname "$(command -v "$py")")/mpiexec
[ -x "$mpiexec" ] || mpiexec=$(command -v mpiexec)
mkdir -p "$out"
net=(MPIR_CVAR_CLIQUES_BY_BLOCK=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=lo)
sweep() {  # nodes ranks arrays
    local nodes=$1 ranks=$2 arrays=$3 name="$out/ar-$1x$(( $2 / $1 ))-$3.json"
    echo "== $nodes node(s) x $(( ranks / nodes )) rank(s), $arrays arrays"
    if [ "$nodes" -gt 1 ]; then
        env "${net[@]}" MPIR_CVAR_NUM_CLIQUES="$nodes" timeout -k 5 300 "$mpiexec" -n "$ranks" \
            "$py" -m mpifed bench allreduce --nodes "$nodes" --arrays "$arrays" -b 4 -e 64M -f 16 \
            --json "$name"
    else
        timeout -k 5 300 "$mpiexec" -n "$ranks" "$py" -m mpifed bench allreduce --arrays "$arrays" \
            -b 4 -e 64M -f 16 --json "$name"
    fi
}
sweep 1 2 ordinary
sweep 2 2 ordinary
sweep 2 4 ordinary
sweep 2 4 window
sweep 4 4 ordinary
sweep 4 4 window
"$py" -m mpifed bench model --fit "$out/ar-1x2-ordinary.json" "$out/ar-2x1-ordinary.json" \
    --predict "$out/ar-2x2-ordinary.json" "$out/ar-2x2-window.json" "$out/ar-4x1-ordinary.json" \
    "$out/ar-4x1-window.json" \
    --json "$out/heldout.json"
