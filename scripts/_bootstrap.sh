# Sourced by every script: makes .venv on first use (and again when a requirements file or this
# script changes), puts it first on PATH (coglet starts its worker as `python` from PATH), and cds
# to the repository root (coglet reads .cog/openapi_schema.json from its working folder).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
stamp="$VENV/.installed-$(cat requirements.txt requirements-dev.txt scripts/_bootstrap.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # Estimates measured on this project's 2-core machine from a fresh clone; each step also says
  # what it took, so a slower machine shows where its time went.
  started=$SECONDS
  took() { echo "    done in $((SECONDS - step_started)) s" >&2; step_started=$SECONDS; }
  if [ -d "$VENV" ]; then
    echo "Updating $VENV (requirements*.txt or scripts/_bootstrap.sh changed) ..." >&2
  else
    echo "Setting up $VENV (first run only, 1 to 2 minutes) ..." >&2
  fi
  python3 -m venv "$VENV"
  step_started=$SECONDS
  # The CPU build of torch first: with it in place, requirements.txt's pin is already met.
  # (On a CUDA machine, install the CUDA build of the same version here instead.)
  torch_pin="$(grep -E '^torch==' requirements.txt)"
  echo "  Installing ${torch_pin/==/ } (the CPU build, a 190 MB wheel; about 30 s) ..." >&2
  "$VENV/bin/pip" install -q "$torch_pin" >&2
  took
  mapfile -t pins < <(grep -hEv '^(#|torch==|$)' requirements.txt requirements-dev.txt | cut -d= -f1)
  named="${pins[*]:0:5}"
  echo "  Installing ${named// /, } and $((${#pins[@]} - 5)) more pins of requirements.txt and" \
    "requirements-dev.txt, with their dependencies (about a minute) ..." >&2
  "$VENV/bin/pip" install -q -r requirements.txt -r requirements-dev.txt >&2
  took
  # torchao's wheel carries CUDA kernels (torchao/_C*.so: CUTLASS sm90a, mxfp8) that
  # torchao/__init__.py loads with torch.ops.load_library on every import, and diffusers imports
  # torchao whenever it is installed. They link torch's CUDA libraries (libtorch_cuda.so,
  # libc10_cuda.so), which a CPU-only torch does not have: with it they can never load, and each
  # failed load would be a warning in every setup log. So where torch has neither CUDA nor ROCm,
  # remove the ones that really fail to load; with a CUDA torch (the image, cog.yaml) all stay.
  "$VENV/bin/python" - >&2 <<'PY'
import importlib.util
from pathlib import Path

import torch

spec = importlib.util.find_spec("torchao")  # finds the package without importing it
if torch.version.cuda is None and torch.version.hip is None and spec and spec.submodule_search_locations:
    for library in sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so")):
        try:
            torch.ops.load_library(str(library))
        except OSError:
            library.unlink()
            print(f"  Removed torchao/{library.name}: CUDA kernels, which this CPU build of torch cannot load")
PY
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  echo "Set up $VENV in $((SECONDS - started)) s" >&2
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
