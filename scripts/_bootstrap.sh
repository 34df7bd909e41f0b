# Sourced by every script: makes .venv on first use (and again when a requirements file
# changes), puts it first on PATH (coglet starts its worker as `python` from PATH), and cds
# to the repository root (coglet reads .cog/openapi_schema.json from its working folder).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
stamp="$VENV/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Setting up $VENV (first run only) ..." >&2
  python3 -m venv "$VENV"
  # The CPU build of torch first: with it in place, requirements.txt's pin is already met.
  # (On a CUDA machine, install the CUDA build of torch==2.13.0 here instead.)
  "$VENV/bin/pip" install -q torch==2.13.0 >&2
  "$VENV/bin/pip" install -q -r requirements.txt -r requirements-dev.txt >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
