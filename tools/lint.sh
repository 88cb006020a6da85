#!/usr/bin/env bash
# Applies the formatters and safe lint fixes to the whole repository, then runs every check CI runs.
# Needs the lint extra: pip install -e ".[lint]". `tools/lint.sh --check` changes nothing (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t csrc < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
if [ "${1:-}" = "--check" ]; then
  ruff check .
  ruff format --check .
  clang-format --dry-run -Werror "${csrc[@]}"
else
  ruff check --fix .
  ruff format .
  clang-format -i "${csrc[@]}"
fi
mypy
