#!/usr/bin/env bash
# Live replay of a capture against guardntp and chronyd side by side (docs/replay.md):
# tcpreplay onto lo of a private network namespace, replies counted by nftables.
# Needs root, tcpreplay, nftables, iproute2 and chrony. Without CAPTURE it makes a
# short mix first (out/live/live.pcap). Extra arguments go to `guardntp replay`.
#   sudo tools/live_replay.sh [CAPTURE] [--rate PPS | --speed X] [--max-seconds S] ...
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
if [ "$(id -u)" -ne 0 ]; then
    echo "live_replay: needs root (it makes a private network namespace)" >&2
    exit 1
fi
capture=${1:-}
if [ -n "$capture" ] && [ "${capture#-}" = "$capture" ]; then
    shift
else
    capture=out/live/live.pcap
    mkdir -p out/live
    "$python" -m guardntp capture make all -o "$capture" --scale 1 --duration 90 --seed 1 -q
fi
report=out/live/report-$(basename "$capture" .pcap)
exec "$python" -m guardntp replay "$capture" --live --against guardntp chronyd \
    --max-seconds 120 --report-dir "$report" "$@"
