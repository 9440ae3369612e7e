#!/usr/bin/env bash
# The test command: builds the ComfyUI hosts (scripts/setup_host.sh) if needed, then runs the suite in them.
#
#   bash scripts/test.sh [--comfyui VERSION] [--frontend VERSION] [pytest arguments]
#
# With neither option it runs the matrix that CI runs, one cell after another:
#   ComfyUI 0.3.75 with its own frontend (1.32.9)   the whole suite
#   ComfyUI 0.33.0 with its own frontend (1.49.6)   the whole suite
#   ComfyUI 0.33.0 with frontend 1.58.1             the browser tests (test_frontend_browser, test_help_pages_browser)
#   ComfyUI 0.3.75 with frontend 1.58.1             the browser tests
# A cell whose ComfyUI source archive is absent (0.33.0 is built from ../shared/hosts; see setup_host.sh) is reported
# as not run, and the others still run. Each cell's result is printed at the end, then the totals in pytest's words
# on the last line; the exit status is non-zero if any cell failed.
# With --comfyui and/or --frontend it runs that one cell (the whole suite, or what the pytest arguments select), e.g.
#   bash scripts/test.sh --comfyui 0.33.0 --frontend 1.58.1 -k apg
# Any other argument goes to pytest, in every cell; the browser cells run only their file, and only when the test
# paths given (if any) include it.
set -uo pipefail
cd "$(dirname "$0")/.."

COMFYUI_VERSION=
FRONTEND_VERSION=
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --comfyui) COMFYUI_VERSION=${2:?--comfyui needs a version}; shift 2 ;;
    --comfyui=*) COMFYUI_VERSION=${1#*=}; shift ;;
    --frontend) FRONTEND_VERSION=${2:?--frontend needs a version}; shift 2 ;;
    --frontend=*) FRONTEND_VERSION=${1#*=}; shift ;;
    *) PYTEST_ARGS+=("$1"); shift ;;
  esac
done

NO_SOURCE=3  # setup_host.sh's exit status for an absent ComfyUI source archive
BROWSER_TESTS=(tests/test_frontend_browser.py tests/test_help_pages_browser.py)
BROWSER_SCOPE="the browser tests"

# Builds the host of one cell and sets VENV, COMFYUI, FRONTEND and FRONTEND_ROOT; returns setup_host.sh's status.
setup_cell() {
  local args=(--comfyui "$1") assignments
  if [ -n "$2" ]; then args+=(--frontend "$2"); fi
  VENV= COMFYUI= FRONTEND= FRONTEND_ROOT=
  assignments=$(bash scripts/setup_host.sh "${args[@]}") || return
  eval "$(grep -E '^(VENV|COMFYUI|FRONTEND|FRONTEND_ROOT)=' <<<"$assignments")"
}

# Runs pytest in the host set up last; GUIDANCE_FRONTEND_ROOT tells the test server which frontend to serve.
run_pytest() {
  export GUIDANCE_COMFYUI=$COMFYUI
  if [ -n "$FRONTEND_ROOT" ]; then export GUIDANCE_FRONTEND_ROOT=$FRONTEND_ROOT; else unset GUIDANCE_FRONTEND_ROOT; fi
  "$VENV/bin/python" -m pytest "$@"  # pyproject.toml points pytest at tests/
}

if [ -n "$COMFYUI_VERSION$FRONTEND_VERSION" ]; then
  setup_cell "${COMFYUI_VERSION:-0.3.75}" "$FRONTEND_VERSION" || exit
  echo "[test] ComfyUI ${COMFYUI_VERSION:-0.3.75}, frontend $FRONTEND" >&2
  run_pytest "${PYTEST_ARGS[@]}"
  exit
fi

CELLS=(  # ComfyUI version | frontend version (empty: the host's own) | what runs
  "0.3.75||whole suite"
  "0.33.0||whole suite"
  "0.33.0|1.58.1|$BROWSER_SCOPE"
  "0.3.75|1.58.1|$BROWSER_SCOPE"
)
# The pytest arguments that name tests (paths, with or without ::node ids) and the others: a browser cell runs its
# file with the others, and only if no paths were given or they include it.
TEST_PATHS=() OPTIONS=()
for arg in "${PYTEST_ARGS[@]}"; do
  if [ "${arg#-}" = "$arg" ] && [ -e "${arg%%::*}" ]; then TEST_PATHS+=("$arg"); else OPTIONS+=("$arg"); fi
done
RESULTS=()
TOTAL_PASSED=0 TOTAL_FAILED=0 TOTAL_SKIPPED=0 ANY_FAILED=0
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# The count of `word` (passed, failed, ...) in a pytest summary line, 0 if absent.
count() { grep -oE "[0-9]+ $1" <<<"$2" | grep -oE '^[0-9]+' | head -1 || true; }

for cell in "${CELLS[@]}"; do
  IFS='|' read -r comfyui frontend scope <<<"$cell"
  title="ComfyUI $comfyui + frontend ${frontend:-(its own)}, $scope"
  targets=()
  if [ "$scope" = "$BROWSER_SCOPE" ]; then
    targets=("${OPTIONS[@]}")
    for file in "${BROWSER_TESTS[@]}"; do  # the browser files that the given paths name, or all of them
      if [ ${#TEST_PATHS[@]} = 0 ] || printf '%s\n' "${TEST_PATHS[@]}" | grep -q "^$file"; then targets+=("$file"); fi
    done
    if [ ${#targets[@]} = ${#OPTIONS[@]} ]; then
      RESULTS+=("NOT RUN  $title: the test paths given do not include them")
      continue
    fi
  else
    targets=("${PYTEST_ARGS[@]}")
  fi
  echo "=============== $title ==============="
  start=$SECONDS
  setup_cell "$comfyui" "$frontend"
  status=$?
  if [ $status = $NO_SOURCE ]; then
    RESULTS+=("NOT RUN  $title: no ComfyUI $comfyui source (see the setup_host message above)")
    continue
  elif [ $status != 0 ]; then
    RESULTS+=("FAIL     $title: setup_host.sh failed ($status)")
    TOTAL_FAILED=$((TOTAL_FAILED + 1)) ANY_FAILED=1
    continue
  fi
  title="ComfyUI $comfyui + frontend $FRONTEND, $scope"
  run_pytest "${targets[@]}" 2>&1 | tee "$LOG"
  status=${PIPESTATUS[0]}
  summary=$(grep -E '([0-9]+ (passed|failed|skipped|errors?)|no tests ran).* in [0-9.]+s\b' "$LOG" | tail -1)
  passed=$(count passed "$summary") failed=$(count failed "$summary") errors=$(count 'errors?' "$summary")
  skipped=$(count skipped "$summary")
  failed=$(( ${failed:-0} + ${errors:-0} ))
  # pytest's 5 is "no tests collected" (e.g. a -k that selects nothing in this cell), which is no failure here.
  if [ $status != 0 ] && [ $status != 5 ] && [ $failed = 0 ]; then failed=1; fi
  verdict=PASS
  if [ $status != 0 ] && [ $status != 5 ]; then verdict=FAIL ANY_FAILED=1; fi
  TOTAL_PASSED=$((TOTAL_PASSED + ${passed:-0})) TOTAL_FAILED=$((TOTAL_FAILED + failed))
  TOTAL_SKIPPED=$((TOTAL_SKIPPED + ${skipped:-0}))
  RESULTS+=("$(printf '%-8s %s: %s passed, %s failed, %s skipped (pytest exit %s, %s s)' "$verdict" "$title" \
    "${passed:-0}" "$failed" "${skipped:-0}" "$status" $((SECONDS - start)))")
done

echo "=============== test matrix ==============="
printf '%s\n' "${RESULTS[@]}"
echo "matrix: $TOTAL_PASSED passed, $TOTAL_FAILED failed, $TOTAL_SKIPPED skipped"
exit $ANY_FAILED
