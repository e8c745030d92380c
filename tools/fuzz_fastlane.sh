#!/usr/bin/env bash
# A bounded fuzz run of the compiled packet decision under AddressSanitizer and
# UndefinedBehaviorSanitizer: tools/fuzz_fastlane.py (compiled vs Pipeline.decide on
# random traffic) against a copy of guardntp/_fastlane.c built with
# -fsanitize=address,undefined in a temporary directory. The in-tree build is never
# touched: the copy sits in a copy of the guardntp package that PYTHONPATH puts first.
#
#   tools/fuzz_fastlane.sh [SECONDS] [DRIVER ARGS...]   (default 60 s; e.g. --seed 7)
#   tools/fuzz_fastlane.sh --self-test                  (must see it fail: ~30 s)
#
# Fails (non-zero) on a sanitizer report, a mismatch between the compiled decision and
# Pipeline.decide, or an exception; the last lines say how to reproduce. Where ASan
# cannot run, it says why and runs the driver on the plain in-tree extension instead
# (FUZZ_REQUIRE_ASAN=1 makes that a failure). PYTHON=... picks the interpreter.
# CPU: one process. Network: none (the lane's socket is never bound).
#
# The default clocks go right up to the int64 limits (now_ns, which both sides read
# within pipeline.EARLIEST_NS..LATEST_NS, and recv_ns, the wall clock), and a datagram
# the compiled core hands to Pipeline.decide instead of deciding it is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}

self_test=0
seconds=60
if [ "${1:-}" = "--self-test" ]; then
    self_test=1
    shift
elif [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    seconds=$1
    shift
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/guardntp-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' HUP INT TERM

say() { echo "fuzz_fastlane.sh: $*" >&2; }

# -- build the instrumented copy
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])') || exit 1
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') \
    || exit 1
"$python" - "$root/guardntp" "$work/pkg/guardntp" <<'EOF' || exit 1
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2],
                ignore=shutil.ignore_patterns("__pycache__", "_fastlane*.so", "*.pyc"))
EOF
so=$work/pkg/guardntp/_fastlane$suffix
sanitize=(-fsanitize=address,undefined -fno-omit-frame-pointer)
asan=1
why=""
libasan=$(gcc -print-file-name=libasan.so 2>/dev/null)
if ! command -v gcc >/dev/null; then
    asan=0; why="gcc is not installed"
elif ! gcc -shared -fPIC -O1 -g "${sanitize[@]}" -Wall -Wextra \
        -Wno-missing-field-initializers -I"$include" guardntp/_fastlane.c -o "$so" \
        2>"$work/build.log"; then
    asan=0; why="the instrumented build failed: $(tail -n 3 "$work/build.log")"
elif [ ! -e "$libasan" ] || [ "$libasan" = libasan.so ]; then
    asan=0; why="gcc has no libasan.so (gcc -print-file-name=libasan.so: '$libasan')"
fi
[ -s "$work/build.log" ] && [ "$asan" = 1 ] && { say "compiler warnings:"; cat "$work/build.log" >&2; }

sanitizer_env=(LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
               UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
               PYTHONMALLOC=malloc PYTHONPATH="$work/pkg" PYTHONDONTWRITEBYTECODE=1)
# PYTHONMALLOC=malloc: every object comes from malloc, so ASan sees a reference the
# extension drops too early as a use after free (pymalloc's arenas would hide it).
if [ "$asan" = 1 ]; then
    # Does an ASan runtime start in this interpreter, and is the copy what gets imported?
    # (From $work: `python -c` puts the current directory, here the source tree, first.)
    if ! (cd "$work" && env "${sanitizer_env[@]}" "$python" -c '
import sys, os, guardntp._fastlane as f
sys.exit(0 if os.path.realpath(f.__file__) == os.path.realpath(sys.argv[1]) else
         f"imported {f.__file__}, not the instrumented copy")' "$so") \
            >"$work/probe.log" 2>&1; then
        asan=0
        why="the interpreter does not run with ASan preloaded: $(grep -m 3 . "$work/probe.log")"
    fi
fi
if [ "$asan" = 1 ]; then
    say "ASan+UBSan build: $so"
    run_env=("${sanitizer_env[@]}")
    expect=$so
else
    say "ASan UNAVAILABLE: $why"
    if [ "${FUZZ_REQUIRE_ASAN:-0}" = 1 ]; then
        say "FUZZ_REQUIRE_ASAN=1: failing instead of fuzzing without sanitizers"
        exit 1
    fi
    say "FALLING BACK to the in-tree extension, WITHOUT sanitizers (mismatches only)"
    run_env=(PYTHONDONTWRITEBYTECODE=1)
    expect=$("$python" -c 'import guardntp._fastlane as f; print(f.__file__)') || exit 1
fi

# run LOG [ENV=...] -- DRIVER ARGS: the driver under the chosen environment; its status,
# made non-zero by any sanitizer report it printed.
run() {
    local log=$1; shift
    local extra=()
    while [ "$1" != "--" ]; do extra+=("$1"); shift; done
    shift
    : >"$work/crumb"
    env "${run_env[@]}" "${extra[@]}" "$python" tools/fuzz_fastlane.py \
        --expect-extension "$expect" --breadcrumb "$work/crumb" "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]} line
    line=$(grep -m1 '^REPRODUCE: .*tools/fuzz_fastlane.py ' "$log")
    [ -n "$line" ] && echo "REPRODUCE under the sanitizers: ${extra[*]:+${extra[*]} }tools/fuzz_fastlane.sh 0 ${line#*tools/fuzz_fastlane.py }" \
        | tee -a "$log"
    if grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' \
            "$log"; then
        [ "$status" -eq 0 ] && status=1
        if ! grep -q '^REPRODUCE:' "$log" && [ -s "$work/crumb" ]; then
            local seed episode step policy keep=() skip=0 arg
            read -r seed episode step policy <"$work/crumb"
            for arg in "$@"; do   # the run's own flags, but its seed, time and length
                if [ "$skip" = 1 ]; then skip=0; continue; fi
                case $arg in
                    --seconds|--seed|--steps|--episode) skip=1 ;;
                    *) keep+=("$arg") ;;
                esac
            done
            say "sanitizer report at seed $seed episode $episode ($policy) step $step"
            echo "REPRODUCE: ${extra[*]:+${extra[*]} }tools/fuzz_fastlane.sh 0 --seed $seed" \
                 "--episode $episode --steps $((step + 1)) ${keep[*]}" | tee -a "$log"
        fi
    fi
    return "$status"
}

if [ "$self_test" = 0 ]; then
    run "$work/run.log" -- --seconds "$seconds" "$@"
    status=$?
    [ "$status" -eq 0 ] || say "FAILED (status $status)"
    [ "$asan" = 1 ] || say "NOTE: this run had NO sanitizers ($why)"
    exit "$status"
fi

# -- self-test: each injected fault must fail the run, and be reported as such
failures=0
expect_failure() {  # NAME PATTERN ENV...
    local name=$1 pattern=$2; shift 2
    run "$work/$name.log" "$@" -- --seconds 20 --seed 1 --times ordinary --no-wild-recv \
        >/dev/null 2>&1
    local status=$?
    if [ "$status" -ne 0 ] && grep -qE "$pattern" "$work/$name.log" \
            && grep -q '^REPRODUCE:' "$work/$name.log"; then
        say "self-test $name: failed as it must (status $status): $(grep -m1 -E "$pattern" \
            "$work/$name.log" | cut -c1-160)"
    else
        say "self-test $name: NOT DETECTED (status $status)"
        tail -n 20 "$work/$name.log" >&2
        failures=$((failures + 1))
    fi
}
expect_failure mismatch 'MISMATCH.*decision' GUARDNTP_FUZZ_INJECT=mismatch:300
expect_failure state 'MISMATCH.*state' GUARDNTP_FUZZ_INJECT=state:300
if [ "$asan" = 1 ]; then
    printf 'int guardntp_fuzz_overflow(int x) { return x + 1; }\n' >"$work/ub.c"
    gcc -shared -fPIC -O0 -fsanitize=undefined "$work/ub.c" -o "$work/ub.so" || exit 1
    expect_failure asan 'ERROR: AddressSanitizer: heap-use-after-free' \
        GUARDNTP_FUZZ_INJECT=asan:300
    expect_failure ubsan 'runtime error: signed integer overflow' \
        GUARDNTP_FUZZ_INJECT=ubsan:300 GUARDNTP_FUZZ_UBSAN_HELPER="$work/ub.so"
else
    say "self-test: no sanitizer checks (ASan unavailable)"
fi
if run "$work/clean.log" -- --seconds 5 --seed 1 --times ordinary --no-wild-recv \
        >/dev/null 2>&1; then
    say "self-test clean: passed as it must"
else
    say "self-test clean: FAILED"; tail -n 20 "$work/clean.log" >&2
    failures=$((failures + 1))
fi
[ "$failures" -eq 0 ] && say "self-test passed" || say "self-test: $failures FAILED"
[ "$failures" -eq 0 ]
