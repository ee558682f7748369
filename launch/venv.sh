#!/usr/bin/env bash
# Creates ./.venv if it is missing, installs jaxlab into it (editable, with the test extras) at the exact
# versions of constraints.txt, then runs the given command inside it. It reinstalls when pyproject.toml,
# setup.py or constraints.txt change (a hash of the three is kept in the venv). Regenerate the pins with
# `bash launch/lock.sh`. Usage: bash launch/venv.sh jaxlab train     |     bash launch/venv.sh pytest
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
inputs="$(cat pyproject.toml setup.py constraints.txt | "$venv/bin/python" -c \
  'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
  echo "[venv] installing jaxlab (editable) and its dependencies, pinned by constraints.txt" >&2
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
  "${pip[@]}" install -c constraints.txt pip >&2
  # setuptools' editable install of the kernels/ -> jaxlab.kernels mapping warns about import shadowing
  # (an information-only warning, relayed by pip): dropped, and only it
  PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
    "${pip[@]}" install -c constraints.txt --build-constraint constraints.txt -e ".[test]" >&2
  echo "$inputs" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
exec "$@"
