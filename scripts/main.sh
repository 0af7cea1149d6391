#!/usr/bin/env bash
# The main job on the embedded model: bootstrap, then `bias-lens run` (extra arguments pass through).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/bias-lens" run "$@"
