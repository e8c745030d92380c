#!/usr/bin/env bash
# Build the wheel users install, put it in a fresh virtualenv and serve from it.
#
# The editable install the tests use reads files straight from the source tree,
# so it cannot notice what a wheel leaves out (the embedded configuration, the
# compiled packet loop, the typing markers). This runs the installed copy, from
# a directory where the source tree is not importable.
#
# Usage: tools/check_wheel.sh        (PYTHON=... to build with another interpreter)
# Network: pip fetches the build backend and cachetools from the package index;
# the server and the query use 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}

work=$(mktemp -d "${TMPDIR:-/tmp}/guardntp-wheel.XXXXXX")
server_pid=""

cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM   # so that the EXIT trap cleans up on a signal too

fail() {
    echo "check_wheel: FAILED: $1" >&2
    if [ -n "${2:-}" ] && [ -s "$2" ]; then
        echo "check_wheel: --- last lines of $(basename "$2") ---" >&2
        tail -n 25 "$2" >&2
    fi
    exit 1
}
step() { echo "check_wheel: $*"; }

[ -x "$python" ] || fail "no interpreter at $python (run tools/bootstrap.sh first)"

# A copy of the working tree without build leftovers: a stale build/ or an
# in-place _fastlane*.so must not stand in for what the wheel build produces.
step "copying the source tree"
mkdir "$work/src"
tar -C "$root" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.so' \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
    --exclude=.benchmarks --exclude='*.pcap' --exclude=./out . \
    | tar -C "$work/src" -xf - || fail "cannot copy $root"

step "building the wheel"
# An absolute path: a bare name would be looked up on the package index.
"$python" -m pip wheel --no-deps --disable-pip-version-check -w "$work/dist" "$work/src" \
    >"$work/build.log" 2>&1 || fail "pip wheel failed" "$work/build.log"
wheels=("$work"/dist/guardntp-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || fail "expected one guardntp wheel in dist/"
wheel=${wheels[0]}

step "checking what $(basename "$wheel") contains"
"$python" - "$wheel" <<'EOF' || fail "the wheel lacks files the installed server needs"
import fnmatch, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
required = ["guardntp/data/default.toml", "guardntp/py.typed", "guardntp/_fastlane.pyi",
            "guardntp/_fastlane.*.so"]
missing = [p for p in required if not fnmatch.filter(names, p)]
for pattern in missing:
    print(f"check_wheel: missing from the wheel: {pattern}", file=sys.stderr)
sys.exit(1 if missing else 0)
EOF

step "installing it into a fresh virtualenv"
# From the build interpreter: the venv gets its base Python, so the wheel's ABI matches.
"$python" -m venv "$work/venv" >"$work/venv.log" 2>&1 || fail "venv failed" "$work/venv.log"
"$work/venv/bin/python" -m pip install --disable-pip-version-check -q "$wheel" \
    >"$work/install.log" 2>&1 || fail "pip install of the wheel failed" "$work/install.log"

# Run the installed copy only: outside the tree, no PYTHONPATH, default loops.
cd "$work"
unset PYTHONPATH GUARDNTP_STATE_DIR GUARDNTP_NO_FASTLANE
guardntp=$work/venv/bin/guardntp

location=$("$work/venv/bin/python" -c 'import guardntp; print(guardntp.__file__)') \
    || fail "guardntp does not import from the fresh virtualenv"
case "$location" in
    "$work/venv/"*) ;;
    *) fail "guardntp imports from $location, not from the fresh virtualenv" ;;
esac
"$work/venv/bin/python" -c '
import sys
from guardntp import fastlane
reason = fastlane.unavailable_because()
if reason:
    sys.exit(f"check_wheel: the compiled packet loop is unusable: {reason}")
' || fail "the installed wheel has no compiled packet loop"

step "guardntp check-config (the embedded default)"
"$guardntp" check-config >"$work/check-config.log" 2>&1 \
    || fail "guardntp check-config failed" "$work/check-config.log"
grep -q '<embedded default>: OK' "$work/check-config.log" \
    || fail "check-config did not report the embedded default OK" "$work/check-config.log"

port=$("$work/venv/bin/python" -c '
import socket
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])')

step "guardntp serve --listen 127.0.0.1:$port"
"$guardntp" serve --listen "127.0.0.1:$port" --state-dir "$work/state" --log-level info \
    >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do   # up to 10 s
    grep -q ' serving ' "$work/serve.log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$server_pid" 2>/dev/null || fail "guardntp serve exited at start" "$work/serve.log"
grep -q ' serving ' "$work/serve.log" || fail "guardntp serve did not start in 10 s" "$work/serve.log"
# The server says which packet loop it runs.
if ! grep -q 'packet loop: compiled' "$work/serve.log"; then
    fail "the installed server does not run the compiled packet loop" "$work/serve.log"
fi

step "guardntp query 127.0.0.1:$port"
"$guardntp" query "127.0.0.1:$port" --timeout 2 >"$work/query.log" 2>&1 \
    || fail "guardntp query got no good answer" "$work/query.log"
cat "$work/query.log"

step "stopping the server (pid $server_pid)"
kill -TERM "$server_pid"
status=0
for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$server_pid" 2>/dev/null && fail "guardntp serve ignored SIGTERM for 10 s" \
    "$work/serve.log"
wait "$server_pid" || status=$?
server_pid=""
[ "$status" -eq 0 ] || fail "guardntp serve exited with status $status" "$work/serve.log"
if grep -q 'Traceback' "$work/serve.log"; then
    fail "guardntp serve printed a traceback" "$work/serve.log"
fi
step "OK: the wheel installs, checks its default configuration, serves and answers"
