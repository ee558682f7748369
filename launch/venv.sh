#!/usr/bin/env bash
# Creates ./.venv if it is missing (or stale), installs jaxlab into it with the test extras, then runs the
# given command inside it. Usage: bash launch/venv.sh jaxlab train     |     bash launch/venv.sh pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${JAXLAB_VENV:-$root/.venv}"
py="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}"
stamp="$venv/.jaxlab-installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "[venv] creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[venv] installing jaxlab (editable) and its dependencies" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e ".[test]" >&2
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
exec "$@"
