#!/usr/bin/env bash
# Prepare a Jetson Orin (JetPack 6) to run vishwamai-edge containers:
#   1. power mode: the fastest nvpmodel mode (MAXN_SUPER or MAXN), unless --power-mode says otherwise
#   2. jetson_clocks: pin CPU, GPU and EMC clocks at their maximum (until the next reboot)
#   3. swap: a swapfile on modules with 8 GB or less (or --swap-gb N), for engine builds and
#      model loads that peak above RAM
#   4. docker: the NVIDIA container runtime as docker's default runtime, so that `docker build`
#      steps see CUDA too (Dockerfile.l4t compiles llama.cpp with CUDA)
# Every step checks the current state first; running it twice changes nothing the second time.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo jetson/setup.sh [options]

Prepare a Jetson Orin for vishwamai-edge: power mode, clocks, swap, docker's default runtime.

Options:
  --dry-run          print what would be done, change nothing (no root needed)
  --power-mode ID    nvpmodel mode id to set (default: the MAXN_SUPER or MAXN mode in /etc/nvpmodel.conf)
  --no-power-mode    leave the power mode alone
  --no-clocks        do not run jetson_clocks
  --swap-gb N        make sure a swapfile gives at least N GB of swap (default: 8 on modules with <= 8 GB RAM, else none)
  --no-swap          do not touch swap
  --swapfile PATH    where to create the swapfile (default: /swapfile; put it on NVMe if you have one)
  --no-docker        do not touch /etc/docker/daemon.json
  -h, --help         show this help

Environment (for testing): DOCKER_DAEMON_JSON (default /etc/docker/daemon.json),
NVPMODEL_CONF (default /etc/nvpmodel.conf).
EOF
}

DRY_RUN=0
POWER_MODE=""
DO_POWER=1
DO_CLOCKS=1
DO_SWAP=1
SWAP_GB=""
SWAPFILE=/swapfile
DO_DOCKER=1
DAEMON_JSON=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
NVPMODEL_CONF=${NVPMODEL_CONF:-/etc/nvpmodel.conf}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --power-mode) POWER_MODE=${2:?--power-mode needs a mode id}; shift ;;
        --no-power-mode) DO_POWER=0 ;;
        --no-clocks) DO_CLOCKS=0 ;;
        --swap-gb) SWAP_GB=${2:?--swap-gb needs a number}; shift ;;
        --no-swap) DO_SWAP=0 ;;
        --swapfile) SWAPFILE=${2:?--swapfile needs a path}; shift ;;
        --no-docker) DO_DOCKER=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -n $SWAP_GB && ! $SWAP_GB =~ ^[0-9]+$ ]]; then
    echo "setup.sh: --swap-gb wants a whole number of GB, got: $SWAP_GB" >&2
    exit 2
fi
if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    echo "setup.sh: changing power mode, swap and docker needs root: run it with sudo (or try --dry-run)" >&2
    exit 1
fi

log() { printf '==> %s\n' "$*"; }

# Run a command, or only show it in a dry run.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '[dry-run] would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

if [[ -r /etc/nv_tegra_release ]]; then
    log "L4T: $(head -n 1 /etc/nv_tegra_release)"
elif [[ $DRY_RUN -eq 1 ]]; then
    log "not a Jetson (no /etc/nv_tegra_release): showing what would be done anyway"
else
    echo "setup.sh: /etc/nv_tegra_release not found: this does not look like a Jetson" >&2
    exit 1
fi

# --- 1. power mode ---------------------------------------------------------------------------
# The mode ids differ between modules and JetPack releases (MAXN is 0 on AGX Orin; Orin Nano
# flashed "Super" has MAXN_SUPER at another id), so look the name up in the module's own table:
#   < POWER_MODEL ID=0 NAME=MAXN >
maxn_mode_id() {
    local name id
    for name in MAXN_SUPER MAXN; do
        id=$(sed -n "s/^< POWER_MODEL ID=\([0-9]*\) NAME=${name} >.*/\1/p" "$NVPMODEL_CONF" 2>/dev/null | head -n 1)
        if [[ -n $id ]]; then
            echo "$id"
            return 0
        fi
    done
    return 1
}

if [[ $DO_POWER -eq 1 ]]; then
    if ! command -v nvpmodel >/dev/null; then
        log "power mode: nvpmodel not found, skipped"
    else
        if [[ -z $POWER_MODE ]] && ! POWER_MODE=$(maxn_mode_id); then
            log "power mode: no MAXN mode in $NVPMODEL_CONF, left as it is"
        fi
        if [[ -n $POWER_MODE ]]; then
            # `nvpmodel -q` prints the mode name, then its id on the last line.
            current=$(nvpmodel -q 2>/dev/null | tail -n 1 || true)
            if [[ $current == "$POWER_MODE" ]]; then
                log "power mode: already $POWER_MODE"
            else
                log "power mode: $current -> $POWER_MODE (some modules ask for a reboot to apply it)"
                run nvpmodel -m "$POWER_MODE"
            fi
        fi
    fi
fi

# --- 2. clocks -------------------------------------------------------------------------------
if [[ $DO_CLOCKS -eq 1 ]]; then
    if command -v jetson_clocks >/dev/null; then
        log "clocks: jetson_clocks (maximum clocks until the next reboot)"
        run jetson_clocks
    else
        log "clocks: jetson_clocks not found, skipped"
    fi
fi

# --- 3. swap ---------------------------------------------------------------------------------
# A swapfile, not more zram: JetPack's nvzramconfig already gives compressed swap, but zram lives
# in the same RAM the model needs; a swapfile on disk (ideally NVMe) adds real capacity for the
# peaks of engine builds and model loading.
if [[ $DO_SWAP -eq 1 ]]; then
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    if [[ -z $SWAP_GB ]]; then
        # 8 GB modules report about 7.4 GiB of MemTotal; 9 GiB separates them from 16 GB ones.
        if ((mem_kb <= 9 * 1024 * 1024)); then SWAP_GB=8; else SWAP_GB=0; fi
    fi
    swap_kb=$(awk '/^SwapTotal:/ {print $2}' /proc/meminfo)
    if ((SWAP_GB == 0)); then
        log "swap: not needed with $((mem_kb / 1024 / 1024)) GiB of RAM (use --swap-gb N to add some)"
    elif grep -q "^$SWAPFILE " /proc/swaps; then
        log "swap: $SWAPFILE already in use"
    elif ((swap_kb >= SWAP_GB * 1024 * 1024)); then
        log "swap: already $((swap_kb / 1024 / 1024)) GiB, at least the ${SWAP_GB} GB asked for"
    else
        log "swap: adding a ${SWAP_GB} GB swapfile at $SWAPFILE"
        if [[ ! -f $SWAPFILE ]]; then
            run fallocate -l "${SWAP_GB}G" "$SWAPFILE"
            run chmod 600 "$SWAPFILE"
            run mkswap "$SWAPFILE"
        fi
        run swapon "$SWAPFILE"
    fi
    if ((SWAP_GB > 0)) && ! grep -q "^${SWAPFILE}[[:space:]]" /etc/fstab; then
        log "swap: adding $SWAPFILE to /etc/fstab so it survives reboots"
        if [[ $DRY_RUN -eq 1 ]]; then
            echo "[dry-run] would append to /etc/fstab: $SWAPFILE none swap sw 0 0"
        else
            echo "$SWAPFILE none swap sw 0 0" >>/etc/fstab
        fi
    fi
fi

# --- 4. docker default runtime ---------------------------------------------------------------
# Merge into the existing daemon.json (other settings are kept); python3 ships with JetPack.
merged_daemon_json() {
    python3 - "$DAEMON_JSON" <<'EOF'
import json, sys
from pathlib import Path

path = Path(sys.argv[1])
config = json.loads(path.read_text() or "{}") if path.exists() else {}
# The entry JetPack's nvidia-container package writes; an existing one is kept as it is.
config.setdefault("runtimes", {}).setdefault("nvidia", {"path": "nvidia-container-runtime", "runtimeArgs": []})
config["default-runtime"] = "nvidia"
print(json.dumps(config, indent=4))
EOF
}

if [[ $DO_DOCKER -eq 1 ]]; then
    if [[ -f $DAEMON_JSON ]] && python3 - "$DAEMON_JSON" 2>/dev/null <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
ok = config.get("default-runtime") == "nvidia" and "nvidia" in config.get("runtimes", {})
sys.exit(0 if ok else 1)
EOF
    then
        log "docker: default runtime is already nvidia ($DAEMON_JSON)"
    else
        if ! command -v nvidia-container-runtime >/dev/null; then
            log "docker: nvidia-container-runtime not found; install it: sudo apt-get install nvidia-container"
        fi
        if ! merged=$(merged_daemon_json 2>/dev/null); then
            echo "setup.sh: $DAEMON_JSON is not valid JSON; fix it, then run this again" >&2
            exit 1
        fi
        log "docker: making nvidia the default runtime in $DAEMON_JSON"
        if [[ $DRY_RUN -eq 1 ]]; then
            echo "[dry-run] would write $DAEMON_JSON:"
            echo "$merged"
            echo "[dry-run] would run: systemctl restart docker"
        else
            mkdir -p "$(dirname "$DAEMON_JSON")"
            # Write to a temporary name and rename: a half-written daemon.json stops docker.
            printf '%s\n' "$merged" >"$DAEMON_JSON.tmp"
            mv "$DAEMON_JSON.tmp" "$DAEMON_JSON"
            if command -v systemctl >/dev/null && systemctl is-active --quiet docker; then
                systemctl restart docker
            fi
        fi
    fi
fi

log "done$([[ $DRY_RUN -eq 1 ]] && echo ' (dry run: nothing was changed)')"
