#!/usr/bin/env bash
# Install PriFed into .venv (created if missing) and run the main job:
# FedAvg on the four-centre UCI heart disease data, with baselines.
# Extra arguments go to `prifed simulate`.
source "$(dirname "$0")/_venv.sh"
cd "$root"
exec "$venv/bin/prifed" simulate "$@"
