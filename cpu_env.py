"""How a script's OpenMP threads wait, set where every script starts, before torch loads.

    import cpu_env  # noqa: F401  (the first import of every script: nothing to call)

torch's CPU kernels, MKL's and oneDNN's run on libgomp's OpenMP threads. A thread that
reaches the end of a parallel region waits for the next one, and by default it spins
(GOMP_SPINCOUNT, about 3 ms) before it sleeps. Alone on a machine that costs nothing; when
two runs share the cores, each run's spinning threads hold the cores the other's working
threads need, and both run about twice as slowly as their fair share.

libgomp reads its settings once, when torch loads it, so they are set here, before any
`import torch`, and only where the user has set none: the user's own environment always
wins (OMP_WAIT_POLICY=ACTIVE brings back spinning). Subprocesses, DataLoader workers
included, inherit them. The thread count stays torch's (one per core); DataLoader workers
run one thread each (torch sets that in every worker).
"""
import os

# spin briefly, then sleep: see bench/bench_share.py for the measurement behind the value
DEFAULTS = {'OMP_WAIT_POLICY': 'PASSIVE'}

if not any(k in os.environ for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')):
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
