#!/usr/bin/env bash
# Start a four-site federation on this machine: one coordinator and one site
# agent per heart disease centre, each a separate process talking HTTPS on
# 127.0.0.1. Logs go to work/; the final model to work/state/.
# Usage: examples/deploy_heart/run.sh [path/to/prifed]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prifed="${1:-$here/../../.venv/bin/prifed}"
work="$here/work"
rm -rf "$work" && mkdir -p "$work"
cp "$here/federation.toml" "$work/"
cd "$work"

"$prifed" ca init --config federation.toml
pids=()
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT

"$prifed" coordinator --config federation.toml > coordinator.out 2>&1 &
pids+=($!)
until [ -f state/coordinator.json ]; do sleep 0.2; done

sites=("Cleveland" "Hungary" "Switzerland" "VA Long Beach")
for site in "${sites[@]}"; do
  slug="${site// /_}"
  "$prifed" ca issue-token --config federation.toml --site "$site" \
    --out "token-$slug"
  "$prifed" site --coordinator https://127.0.0.1:8443 --ca pki/ca.pem \
    --name "$site" --state-dir "sites/$slug" --token-file "token-$slug" \
    --threads 1 > "site-$slug.out" 2>&1 &
  pids+=($!)
done

echo "federation running; follow it with: tail -f $work/state/coordinator.log"
wait "${pids[0]}"
"$prifed" ca status --config federation.toml
python3 -c "import json; s = json.load(open('state/summary.json')); \
print('mean test accuracy after the last round:', \
round(s['final']['mean_accuracy'], 3))"
