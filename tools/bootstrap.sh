#!/usr/bin/env bash
# Set up guardntp in ./.venv. With --test-deps also install the real peers the tests
# talk to (Debian: chrony, ntpsec-ntpdate) and the tools of the replay and blocklist
# tests (tcpreplay, nftables, iproute2). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test_deps=0
[ "${1:-}" = "--test-deps" ] && want_test_deps=1

if [ "$want_test_deps" = 1 ]; then
    missing=()
    command -v chronyd   >/dev/null 2>&1 || missing+=(chrony)
    command -v ntpdig    >/dev/null 2>&1 || missing+=(ntpsec-ntpdate)
    command -v tcpreplay >/dev/null 2>&1 || missing+=(tcpreplay)
    command -v nft       >/dev/null 2>&1 || missing+=(nftables)
    command -v ip        >/dev/null 2>&1 || missing+=(iproute2)
    command -v setpriv   >/dev/null 2>&1 || missing+=(util-linux)
    command -v systemd-socket-activate >/dev/null 2>&1 || missing+=(systemd)
    [ -d /usr/lib/python3/dist-packages/ntp ] || missing+=(python3-ntp)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "bootstrap: need root to install: ${missing[*]} (or install them and re-run)" >&2
            exit 1
        fi
        echo "bootstrap: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Debian's chrony package may start a daemon; it must not steer this machine's
    # clock during tests nor hold port 123.
    if command -v pkill >/dev/null 2>&1; then pkill -x chronyd 2>/dev/null || true; fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[dev]'
echo "bootstrap: ready (.venv/bin/guardntp)"
