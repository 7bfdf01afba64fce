#!/usr/bin/env bash
# The separate venv for the LitServe and BentoML rows of bench/run.py, so their dependencies
# never touch the project's .venv. bench/run.py marks those rows "not run" without it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
.venv-bench/bin/python -m pip install --quiet --disable-pip-version-check \
    litserve bentoml onnxruntime numpy
.venv-bench/bin/python -m pip list 2>/dev/null | grep -i -E "^(litserve|bentoml|onnxruntime) "
