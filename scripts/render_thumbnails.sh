#!/usr/bin/env bash
# Renders the template thumbnails workflows/<name>.jpg (scripts/render_thumbnails.py: a reference-model workflow's
# from its own output, the others as designed cards), building the ComfyUI host first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup_host.sh | grep -E '^(VENV|COMFYUI)=')"
exec "$VENV/bin/python" scripts/render_thumbnails.py --comfyui "$COMFYUI" "$@"
