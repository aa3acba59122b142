# Sourced by bin/nzgw and bin/test: make .venv match pdm.lock, then put it first on PATH.
#
# Needs only python3 (>= 3.11). PDM itself lives in its own venv (.venv-tools) so that the
# project's environment holds exactly what pdm.lock pins. The sync is skipped when the lock,
# pyproject.toml and this script are unchanged since the last successful one (a stamp file).
# shellcheck shell=bash
set -euo pipefail
NZGW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-python3}"
_pdm_spec=("pdm==2.29.4" "hishel[httpx2]>=1.4,<2")   # pdm 2.29 breaks with hishel 2.x

_nzgw_stamp() {
    cat "$NZGW_ROOT/pdm.lock" "$NZGW_ROOT/pyproject.toml" "$NZGW_ROOT/bin/_bootstrap.sh" \
        | "$_py" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

_nzgw_bootstrap() {
    "$_py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "nzgw needs Python >= 3.11 (found: $("$_py" --version 2>&1))" >&2; exit 2; }
    local want have=""
    want="$(_nzgw_stamp)"
    [ -f "$NZGW_ROOT/.venv/.nzgw-stamp" ] && have="$(cat "$NZGW_ROOT/.venv/.nzgw-stamp")"
    [ "$want" = "$have" ] && [ -x "$NZGW_ROOT/.venv/bin/python" ] && return 0
    # Say what is happening as it happens: a first run downloads and installs everything.
    local started=$SECONDS packages
    packages="$(grep -c '^\[\[package\]\]' "$NZGW_ROOT/pdm.lock" || true)"
    if [ -x "$NZGW_ROOT/.venv/bin/python" ]; then
        echo "nzgw: pdm.lock, pyproject.toml or bin/_bootstrap.sh changed: syncing .venv ($packages packages locked) ..." >&2
    else
        echo "nzgw: first run: setting up the environment (a few minutes; later runs skip this)" >&2
    fi
    if [ ! -x "$NZGW_ROOT/.venv-tools/bin/pdm" ]; then
        echo "nzgw: [1/3] creating .venv-tools and installing pdm into it ..." >&2
        "$_py" -m venv "$NZGW_ROOT/.venv-tools"
        "$NZGW_ROOT/.venv-tools/bin/pip" install --quiet --disable-pip-version-check "${_pdm_spec[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
        [ -x "$NZGW_ROOT/.venv-tools/bin/pdm" ] || { echo "nzgw: could not install pdm" >&2; exit 1; }
    fi
    if [ ! -x "$NZGW_ROOT/.venv/bin/python" ]; then
        echo "nzgw: [2/3] creating the project environment .venv ..." >&2
        "$_py" -m venv "$NZGW_ROOT/.venv"
    fi
    echo "nzgw: [3/3] pdm sync: installing into .venv what it lacks of the $packages locked packages ..." >&2
    (cd "$NZGW_ROOT" && PDM_IGNORE_ACTIVE_VENV=1 PDM_CHECK_UPDATE=false \
        "$NZGW_ROOT/.venv-tools/bin/pdm" sync --clean -G dev --venv in-project >&2) || {
        # pdm may not know the venv yet: point it at .venv explicitly and retry once.
        (cd "$NZGW_ROOT" && PDM_CHECK_UPDATE=false \
            "$NZGW_ROOT/.venv-tools/bin/pdm" use --quiet -f "$NZGW_ROOT/.venv/bin/python" >&2 &&
            PDM_CHECK_UPDATE=false "$NZGW_ROOT/.venv-tools/bin/pdm" sync --quiet --clean -G dev >&2)
    }
    echo "$want" > "$NZGW_ROOT/.venv/.nzgw-stamp"
    echo "nzgw: .venv is ready ($packages packages, $((SECONDS - started)) s)" >&2
}

_nzgw_bootstrap
export PATH="$NZGW_ROOT/.venv/bin:$PATH"
export VIRTUAL_ENV="$NZGW_ROOT/.venv"
