#!/usr/bin/env bash
# "auto" against the fastest algorithm at every size from 64 KiB to 16 MiB, on 1x2, 4x1 and
# 2x2 emulated nodes (TCP over loopback between nodes), ordinary and window arrays: each
# configuration measures its own table (MPIFED_AUTOTUNE=refresh, a cache folder under OUT_DIR),
# then sweeps every size ROUNDS times (medians over the rounds; default 3).
#
#     bench/auto_sweeps.sh OUT_DIR [PYTHON] [ROUNDS]     (PYTHON defaults to .venv/bin/python)
#
# Under mpifed.shaped_link (python -m mpifed.shaped_link --rate 1gbit -- bench/auto_sweeps.sh
# ...) the links between nodes are the shaped ones. Writes OUT_DIR/auto-<nodes>x<per node>-
# <arrays>.json; prints each table and, last, the worst auto/best of each configuration.
set -euo pipefail
out=${1:?usage: bench/auto_sweeps.sh OUT_DIR [PYTHON] [ROUNDS]}
py=${2:-.venv/bin/python}
rounds=${3:-3}
mpiexec=$(dirname "$(command -v "$py")")/mpiexec
[ -x "$mpiexec" ] || mpiexec=$(command -v mpiexec)
mkdir -p "$out"
net=(MPIR_CVAR_CLIQUES_BY_BLOCK=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=lo)
sweep() {  # nodes ranks arrays
    local nodes=$1 ranks=$2 arrays=$3 name="$out/auto-$1x$(( $2 / $1 ))-$3.json"
    local vars=(XDG_CACHE_HOME="$out/cache" MPIFED_AUTOTUNE=refresh OMP_NUM_THREADS=1)
    [ "$nodes" -gt 1 ] && vars+=("${net[@]}" MPIR_CVAR_NUM_CLIQUES="$nodes")
    echo "== $nodes node(s) x $(( ranks / nodes )) rank(s), $arrays arrays"
    env "${vars[@]}" timeout -k 5 900 "$mpiexec" -n "$ranks" "$py" -m mpifed bench allreduce \
        --nodes "$nodes" --arrays "$arrays" -b 64K -e 16M -f 2 --rounds "$rounds" \
        --auto measured --json "$name" | tee "$name.log"
}
for arrays in ordinary window; do
    sweep 1 2 "$arrays"
    sweep 4 4 "$arrays"
    sweep 2 4 "$arrays"
done
echo "== worst auto/best, 64 KiB-16 MiB (goal <= 1.10x)"
grep -H "vs the fastest\|fastest call\|split:" "$out"/auto-*.log
