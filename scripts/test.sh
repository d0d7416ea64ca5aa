#!/usr/bin/env bash
# Install PriFed with its test tools into .venv (created if missing) and run
# the whole test suite. Extra arguments go to pytest.
extras=dev
source "$(dirname "$0")/_venv.sh"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
