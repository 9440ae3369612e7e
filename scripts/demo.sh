#!/usr/bin/env bash
# The main job: builds the ComfyUI host if needed, then runs the APG workflow headless on the embedded reference
# model through ComfyUI's HTTP API and writes a CFG-vs-APG comparison (default out/apg_demo.png; --out PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup_host.sh | grep -E '^(VENV|COMFYUI)=')"
exec "$VENV/bin/python" scripts/demo.py --comfyui "$COMFYUI" "$@"
