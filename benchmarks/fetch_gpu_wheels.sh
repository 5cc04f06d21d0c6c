#!/usr/bin/env bash
# The wheels `make gpu-check` carries to a bare GPU machine (Python 3.12 with torch, lightning, tokenizers,
# matplotlib, scipy, einops, rich, PyYAML and packaging, but no Hydra): hydra-core, omegaconf and the antlr4
# runtime that omegaconf pins (4.9.*, published only as a source archive, so it is built into a pure-Python
# wheel here). `datasets` and `wandb` are not needed: local data files load without `datasets`, and wandb
# is imported only with logger=wandb. Then the peers the moe_layer stage measures beside our layer:
# transformers (Hugging Face's grouped_mm experts; the version this venv has) with huggingface-hub,
# safetensors and regex, and torchtitan 0.3.0 with spmd_types, tyro and tyro's own dependencies
# (PEERS=0 skips them: 0.4 MB instead of about 17 MB). Writes .whl/ in the repository root (git-ignored).
#   benchmarks/fetch_gpu_wheels.sh [python]      (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hydra-core==1.3.8 omegaconf==2.3.1
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" antlr4-python3-runtime==4.9.3
"$PY" -m pip wheel -q --no-deps -w .whl "$tmp"/antlr4-python3-runtime-4.9.3.tar.gz
rm -rf "$tmp"
if [ "${PEERS:-1}" = 1 ]; then
  transformers=$("$PY" -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo 5.25.0)
  hub=$("$PY" -c "import huggingface_hub; print(huggingface_hub.__version__)" 2>/dev/null || echo 1.0.0)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "transformers==$transformers" "huggingface-hub==$hub" safetensors regex \
      torchtitan==0.3.0 spmd_types tyro docstring-parser typeguard shtab
fi
ls -l .whl
