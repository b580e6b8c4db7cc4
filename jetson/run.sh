#!/usr/bin/env bash
# Run the vishwamai-edge image on a Jetson with the GPU, the models folder and the web UI port.
# Everything after the options (or after --) goes to `vishwamai-edge` inside the container.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: jetson/run.sh [options] [--] [vishwamai-edge arguments...]

Run the vishwamai-edge container on a Jetson (GPU via the NVIDIA runtime, models folder
mounted at /models). For `ui` and `serve`, the server inside listens on the container's
interface and its port is published on the host's 127.0.0.1 only (reach it from another
machine through an SSH tunnel).

Options:
  --image IMAGE     image to run (default: vishwamai-edge:l4t; $VISHWAMAI_IMAGE)
  --models DIR      host folder with bundles, mounted at /models (default: ~/vishwamai-models; $VISHWAMAI_MODELS)
  --port N          host port on 127.0.0.1 for `ui` / `serve` (default: the server's, 7860 / 8000)
  --name NAME       container name (default: one docker picks)
  --dry-run         print the docker run command instead of running it
  -h, --help        show this help

Examples:
  jetson/run.sh doctor
  jetson/run.sh chat /models/smollm2-135m/orin-nx-16
  jetson/run.sh ui /models/smollm2-135m/orin-nx-16
  jetson/run.sh --dry-run demo
EOF
}

IMAGE=${VISHWAMAI_IMAGE:-vishwamai-edge:l4t}
MODELS=${VISHWAMAI_MODELS:-$HOME/vishwamai-models}
PORT=""
NAME=""
DRY_RUN=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --image) IMAGE=${2:?--image needs a value}; shift ;;
        --models) MODELS=${2:?--models needs a folder}; shift ;;
        --port) PORT=${2:?--port needs a number}; shift ;;
        --name) NAME=${2:?--name needs a value}; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "run.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done

if [[ -n $PORT && ! $PORT =~ ^[0-9]+$ ]]; then
    echo "run.sh: --port wants a number, got: $PORT" >&2
    exit 2
fi

# A server inside the container must listen on the container's interface: on its loopback
# (the command's default) a published port would lead nowhere. The host side stays loopback.
args=("$@")
container_port=""
if [[ ${1:-} == ui || ${1:-} == serve ]]; then
    [[ $1 == ui ]] && container_port=7860 || container_port=8000
    has_host=0
    for ((i = 1; i < ${#args[@]}; i++)); do
        case "${args[i]}" in
            --host | --host=*) has_host=1 ;;
            --port) container_port=${args[i + 1]:-$container_port} ;;
            --port=*) container_port=${args[i]#--port=} ;;
        esac
    done
    if [[ $has_host -eq 0 ]]; then
        args=("$1" --host 0.0.0.0 "${args[@]:1}")
    fi
    PORT=${PORT:-$container_port}
fi
# docker -v needs an absolute path; a relative one would be taken as a named volume.
if [[ $MODELS != /* ]]; then
    MODELS="$PWD/$MODELS"
fi

cmd=(docker run --rm)
if [[ -n $NAME ]]; then
    cmd+=(--name "$NAME")
fi
cmd+=(--runtime nvidia --gpus all)
if [[ -n $container_port ]]; then
    cmd+=(-p "127.0.0.1:${PORT}:${container_port}")
fi
cmd+=(-v "${MODELS}:/models")
# Interactive chat needs a terminal; a pipe or a service does not get one.
if [[ -t 0 && -t 1 ]]; then
    cmd+=(-it)
fi
# The host's L4T release, so that `doctor` inside reports the real JetPack, not the image's, and
# the device tree's model and SKU, which Docker hides in containers (it masks /sys/firmware).
if [[ -f /etc/nv_tegra_release ]]; then
    cmd+=(-v /etc/nv_tegra_release:/etc/nv_tegra_release:ro)
fi
for entry in model compatible; do
    if [[ -f /proc/device-tree/$entry ]]; then
        cmd+=(-v "/proc/device-tree/$entry:/run/vishwamai-edge/device-tree/$entry:ro")
    fi
done
# Cameras (image input) and sound devices (audio input), when the host has them.
for dev in /dev/video[0-9]*; do
    [[ -e $dev ]] && cmd+=(--device "$dev")
done
if [[ -d /dev/snd ]]; then
    cmd+=(--device /dev/snd)
fi
cmd+=("$IMAGE" "${args[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi
if [[ ! -d $MODELS ]]; then
    echo "run.sh: models folder $MODELS does not exist; create it or pass --models DIR" >&2
    exit 1
fi
exec "${cmd[@]}"
