#!/usr/bin/env bash
# Install LiteLLM's proxy (the peer of bench/gateway.py) in its own venv under bench/.venvs
# (ignored by git). Virtual keys need its PostgreSQL schema and the Prisma client, whose
# `prisma generate` fetches Prisma's engine binaries; see docs/benchmarks.md for whether
# that worked on this machine. 1.107.0 was a compromised release: never install it; newer
# releases than 1.102.4 require a certifi newer than this machine's package mirror has.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venvs/litellm
LITELLM_VERSION=${LITELLM_VERSION:-1.102.4}
mkdir -p .venvs
if [ ! -x "$VENV/bin/litellm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "litellm[proxy]==$LITELLM_VERSION" prisma
fi
