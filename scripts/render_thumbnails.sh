#!/usr/bin/env bash
# Renders the template thumbnails workflows/<name>.jpg from each workflow's own output (scripts/render_thumbnails.py),
# building the ComfyUI host first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup_host.sh | grep -E '^(VENV|COMFYUI)=')"
exec "$VENV/bin/python" scripts/render_thumbnails.py --comfyui "$COMFYUI" "$@"
