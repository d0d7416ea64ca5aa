# Shared by the quick-start scripts: create or reuse .venv and install PriFed.
# Usage: [extras=dev] source scripts/_venv.sh
# A sourced file sees the caller's arguments as $1, so the extras come in a
# variable.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PRIFED_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
extras="${extras:-}"
target="$root"
[ -n "$extras" ] && target="$root[$extras]"
# torch==2.13.0 is pinned in pyproject.toml, so pip takes the CPU wheel.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
