# Sourced by .ci/run and bench/run: a virtual environment with everything weightsync needs,
# and the extension built in place with its CUDA part. Idempotent and incremental: a second
# run reuses the environment and ninja rebuilds only what changed.
#
#   WEIGHTSYNC_VENV         where the environment lives (default ~/.cache/weightsync/venv)
#   TORCH_CUDA_ARCH_LIST    CUDA archs to compile for (default 9.0; no GPU is needed to build)
#   WEIGHTSYNC_TORCH_SPEC   the torch to install (default: the registry's CUDA 13.0 build)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${WEIGHTSYNC_VENV:-$HOME/.cache/weightsync/venv}
torch_spec=${WEIGHTSYNC_TORCH_SPEC:-torch==2.14.*}
requirements=("$torch_spec" tensordict torchrl pytest pytest-benchmark numpy ninja setuptools wheel)
stamp="$venv/.weightsync-requirements"

log() { printf '\n== %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]; then
  log "installing ${requirements[*]}"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${requirements[@]}"
  echo "${requirements[*]}" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

log "building the extension (CUDA archs: $TORCH_CUDA_ARCH_LIST)"
(cd "$repo_root" && MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .)
