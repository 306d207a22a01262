#!/usr/bin/env bash
# Build the one-folder desktop bundle dist/interp-workbench/ with PyInstaller, from the project's venv.
#
#   packaging/build.sh                 # uses ./.venv (or $PYTHON), installs PyInstaller 6 there if missing
#   PYTHON=/path/to/python packaging/build.sh
#
# The bundle contains whatever torch the environment has (CPU or CUDA); see packaging/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    echo "error: no Python at $PYTHON; create the venv (python -m venv .venv && .venv/bin/pip install -e .) or set PYTHON." >&2
    exit 2
fi

"$PYTHON" -c "import desktop_app" 2>/dev/null || {
    echo "error: desktop_app is not importable by $PYTHON; run '$PYTHON -m pip install -e .' first." >&2
    exit 2
}
if ! "$PYTHON" -m PyInstaller --version >/dev/null 2>&1; then
    echo "installing PyInstaller into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install "pyinstaller==6.*"
fi
if [[ ! -f resources/demo/experiment.json ]]; then
    echo "warning: resources/demo/ has no demo; run '$PYTHON packaging/train_demo.py' to include it." >&2
fi

"$PYTHON" -m PyInstaller --noconfirm --clean \
    --distpath "$ROOT/dist" --workpath "$ROOT/build/pyinstaller" \
    packaging/interp-workbench.spec

APP="$ROOT/dist/interp-workbench/interp-workbench"
echo "built $APP ($(du -sh "$ROOT/dist/interp-workbench" | cut -f1))"
"$APP" --version
