"""The llama.cpp engine.

llama.cpp's CPU backend is built with OpenMP here, and libgomp's threads spin before they
sleep: about 300,000 pauses (several ms) after each graph and at every barrier inside it.
A server never has its cores to itself (the event loop, database threads, other models,
neighbours on the host), and a worker spinning after a decode takes the core the event
loop needs, which then takes one back from the next decode, whose barriers stall on it.
With one short spin before sleeping, a loaded 2-core machine served a stream 3x faster
(docs/benchmarks.md, "OpenMP spinning"). libgomp reads the setting once, when it is
loaded with llama.cpp, so it is set here, before any module of this package imports
`llama_cpp`; an operator's `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` is kept (libgomp lets the
spin count override the policy, so neither is added beside one the operator set).
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
