#!/usr/bin/env bash
# The project's test command: lint (pylint with the repo pylintrc), then the test suite.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pylint --rcfile=pylintrc MaxText benchmarks
python3 -m pytest --pyargs MaxText.tests "$@"
