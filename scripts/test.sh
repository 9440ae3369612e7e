#!/usr/bin/env bash
# The test command: builds the ComfyUI host (scripts/setup_host.sh) if needed, then runs the whole suite in it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k apg -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup_host.sh | grep -E '^(VENV|COMFYUI)=')"
export GUIDANCE_COMFYUI="$COMFYUI"
exec "$VENV/bin/python" -m pytest "$@"  # pyproject.toml points pytest at tests/
