#!/usr/bin/env bash
# The main job on its embedded default: set up (idempotent), then `deer demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/deer demo "$@"
