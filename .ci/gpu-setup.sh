#!/usr/bin/env bash
# On the lent GPU host (Python 3.12, torch + CuPy preinstalled, no package index): install the
# carried wheels (.whl, built by ../shared/gpu-wheelhouse.sh) and talkrt itself into /tmp/site.
# Use: bash .ci/gpu-setup.sh && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site .
