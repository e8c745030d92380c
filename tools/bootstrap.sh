#!/usr/bin/env bash
# Set up guardntp in ./.venv. With --test-deps also install the real peers the tests
# talk to (Debian: chrony, ntpsec-ntpdate) and the tools of the replay and blocklist
# tests (tcpreplay, nftables, iproute2). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's chrony package starts chronyd when installed: it would steer this
# machine's clock during the tests and hold port 123. Maintainer scripts start
# services through invoke-rc.d (deb-systemd-invoke under systemd), which asks
# /usr/sbin/policy-rc.d first; exit status 101 means "not now". Ours is there
# only while apt-get install runs; an operator's own policy-rc.d is put back.
# A chronyd that was already running is this machine's and is left alone.
policy_rc=/usr/sbin/policy-rc.d
policy_backup=""
policy_ours=0

forbid_service_starts() {
    trap allow_service_starts EXIT
    trap 'exit 1' HUP INT TERM
    if [ -e "$policy_rc" ] || [ -L "$policy_rc" ]; then
        local saved
        saved=$(mktemp "$policy_rc.guardntp-saved.XXXXXX")
        mv -f "$policy_rc" "$saved" || { rm -f "$saved"; return 1; }
        policy_backup=$saved
    fi
    policy_ours=1
    printf '#!/bin/sh\n# guardntp tools/bootstrap.sh: no service starts during its apt-get install\nexit 101\n' \
        >"$policy_rc"
    chmod 755 "$policy_rc"
}

allow_service_starts() {
    if [ "$policy_ours" = 1 ]; then
        rm -f "$policy_rc"
        policy_ours=0
    fi
    if [ -n "$policy_backup" ]; then
        mv -f "$policy_backup" "$policy_rc"
        policy_backup=""
    fi
    trap - EXIT HUP INT TERM
}

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
        forbid_service_starts
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        allow_service_starts
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[dev]'
echo "bootstrap: ready (.venv/bin/guardntp)"
