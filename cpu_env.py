"""How a script's OpenMP threads wait, set where every script starts, before torch loads.

    import cpu_env  # noqa: F401  (the first import of every script: nothing to call)

torch's CPU kernels, MKL's and oneDNN's run on OpenMP threads (libgomp in PyPI's torch). A
thread that reaches the end of a parallel region waits for the next one, and libgomp's
default is to spin for a while first (GOMP_SPINCOUNT=300000, milliseconds) before it sleeps.
Alone on a machine that costs nothing; when two runs share the cores, each run's spinning
threads hold the cores the other's working threads need, and both run far slower than
their fair share (bench/bench_share.py measures it).

So threads spin briefly, then sleep: GOMP_SPINCOUNT=3000 (tens of microseconds, which
still bridges most gaps between one op and the next of the same run; a shorter spin costs a
run alone more wake-ups, a longer one costs a shared CPU more spinning) for libgomp, and
OMP_WAIT_POLICY=PASSIVE for the OpenMP runtimes that know no GOMP_SPINCOUNT (Intel's and
LLVM's, in other torch builds); libgomp lets GOMP_SPINCOUNT override the policy's zero spin.

libgomp reads its settings once, when torch loads it, so they are set here, before any
`import torch`, and only where the user has set neither: the user's own environment always
wins (OMP_WAIT_POLICY=ACTIVE or GOMP_SPINCOUNT=300000 bring back the old spinning).
Subprocesses, DataLoader workers included, inherit them. The thread count stays torch's
(one per core); DataLoader workers run one thread each (torch sets that in every worker).
"""
import os

DEFAULTS = {'OMP_WAIT_POLICY': 'PASSIVE', 'GOMP_SPINCOUNT': '3000'}

if not any(k in os.environ for k in DEFAULTS):
    os.environ.update(DEFAULTS)
