#!/usr/bin/env bash
# Regenerate the standard replay corpus (docs/replay.md): each scenario alone, the
# mixes, and a one-million-packet mix, all seed 1, 600 s, into DIR (default out/corpus,
# which git ignores). Captures are never committed: this script is how to get them.
#   tools/make_corpus.sh [DIR] [SCALE]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-out/corpus}
scale=${2:-1}
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
mkdir -p "$dir"

make() {  # make NAME SCENARIO... (extra flags after --)
    local name=$1; shift
    echo "== $dir/$name.pcap"
    "$python" -m guardntp capture make "$@" -o "$dir/$name.pcap" --seed 1 --duration 600 -q
}

for scenario in netgear-2003 dlink-2005 smc-2003 mobatime-2009 spoofed-random \
                reflection-probes top-of-hour chrony w32time cgnat ipv6-hosts; do
    make "$scenario" "$scenario" --scale "$scale"
done
make floods floods --scale "$scale"
make normal normal --scale "$scale"
make all all --scale "$scale"
# About a million packets: the size the generator is built for.
make million all --scale "$(awk -v s="$scale" 'BEGIN { print 1.3 * s }')"
echo "corpus in $dir; replay one with: $python -m guardntp replay $dir/all.pcap --report-dir out/report"
