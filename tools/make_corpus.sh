#!/usr/bin/env bash
# Regenerate the standard replay corpus (docs/replay.md): each scenario alone, the
# mixes (floods, normal, all), and a mix of over a million packets, all seed 1,
# 600 s, into DIR (default out/corpus, which git ignores). Captures are never
# committed: this script is how to get them. The scenario and mix names come from
# guardntp/replay/scenarios.py (SCENARIOS, MIXES), so a new scenario joins by itself.
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

scenarios=$("$python" -c 'from guardntp.replay.scenarios import SCENARIOS; print(*SCENARIOS)')
mixes=$("$python" -c 'from guardntp.replay.scenarios import MIXES; print(*MIXES)')
for scenario in $scenarios; do
    make "$scenario" "$scenario" --scale "$scale"
done
for mix in $mixes; do
    make "$mix" "$mix" --scale "$scale"
done
# `all` at scale 1.3: about 1.2 million packets (all at scale 1 is about 970,000),
# the size the generator is built for.
make million all --scale "$(awk -v s="$scale" 'BEGIN { print 1.3 * s }')"
echo "corpus in $dir; replay one with: $python -m guardntp replay $dir/all.pcap --report-dir out/report"
