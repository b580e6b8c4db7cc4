#!/usr/bin/env bash
# Sample Jetson load, memory, clocks, temperatures and power with tegrastats into a log file,
# for a fixed time or until stopped (Ctrl-C, SIGTERM). Run it beside a benchmark:
#   jetson/tegrastats.sh --interval 500 --logfile run1.tegrastats.log &
#   ...benchmark...
#   kill %1
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: jetson/tegrastats.sh [--interval MS] [--duration SECONDS] [--logfile FILE]

Run `tegrastats --interval MS --logfile FILE` for SECONDS, or until killed (SIGINT/SIGTERM).

Options:
  --interval MS       sampling period in milliseconds (default: 1000)
  --duration SECONDS  stop after this many seconds (default: run until killed)
  --logfile FILE      where tegrastats writes its lines (default: tegrastats-<date>-<time>.log)
  -h, --help          show this help

Run it with sudo for the complete set of fields (some rails and clocks need root).
Environment: TEGRASTATS (default: tegrastats on PATH, else /usr/bin/tegrastats).
EOF
}

INTERVAL=1000
DURATION=""
LOGFILE="tegrastats-$(date +%Y%m%d-%H%M%S).log"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --interval) INTERVAL=${2:?--interval needs milliseconds}; shift ;;
        --duration) DURATION=${2:?--duration needs seconds}; shift ;;
        --logfile) LOGFILE=${2:?--logfile needs a path}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "tegrastats.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ ! $INTERVAL =~ ^[0-9]+$ || $INTERVAL -eq 0 ]]; then
    echo "tegrastats.sh: --interval wants a positive number of milliseconds, got: $INTERVAL" >&2
    exit 2
fi
if [[ -n $DURATION && ! $DURATION =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "tegrastats.sh: --duration wants a number of seconds, got: $DURATION" >&2
    exit 2
fi

TEGRASTATS=${TEGRASTATS:-$(command -v tegrastats || echo /usr/bin/tegrastats)}
if [[ ! -x $TEGRASTATS ]]; then
    echo "tegrastats.sh: tegrastats not found (it ships with JetPack's nvidia-l4t-tools); is this a Jetson?" >&2
    exit 1
fi

# tegrastats runs in the foreground here (not its own --start daemon), so that stopping this
# script, by timer or by signal, stops exactly the sampler it started and nothing else.
"$TEGRASTATS" --interval "$INTERVAL" --logfile "$LOGFILE" &
sampler=$!
sleeper=""

stop() {
    local pid
    for pid in "$sampler" $sleeper; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}
trap 'stop; echo "tegrastats.sh: stopped; samples in $LOGFILE" >&2; exit 0' INT TERM
trap stop EXIT

echo "tegrastats.sh: sampling every ${INTERVAL} ms into $LOGFILE${DURATION:+ for ${DURATION} s} (pid $sampler)" >&2
if [[ -n $DURATION ]]; then
    sleep "$DURATION" &
    sleeper=$!
    # wait returns early on a signal, so the INT/TERM trap still runs promptly.
    wait "$sleeper"
    stop
    echo "tegrastats.sh: done; samples in $LOGFILE" >&2
else
    wait "$sampler"
fi
