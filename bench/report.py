"""What every benchmark prints besides its figures: the machine they come from, and a Markdown table.

A figure means little without its machine: the CPU (vendor and model), its cores, the
library the fused LSTM multiplies with (MKL or oneDNN, see fused_lstm.py), how OpenMP's
threads wait (cpu_env.py) and the load average, which says whether other work shared the
cores. Scripts import this after cpu_env (bench/ is on sys.path when one runs).
"""
import os
import platform

import torch

import fused_lstm
from utils import cpu_info


def cpu_name():
    """'Intel(R) Xeon(R) Processor', 'AMD EPYC 7B13', ... as /proc/cpuinfo says."""
    return cpu_info('model name') or platform.processor() or 'unknown CPU'


def machine(threads=None):
    """One line naming the machine: CPU, vendor, cores, torch, the LSTM's CPU matmul library,
    OpenMP's waiting, threads and the load average now."""
    waiting = ', '.join(f'{k}={os.environ[k]}' for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT') if k in os.environ)
    return (f'machine: {cpu_name()} ({fused_lstm._CPU_VENDOR or "unknown vendor"}, {os.cpu_count()} cores, '
            f'{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, '
            f'LSTM CPU matmuls {fused_lstm.cpu_matmul(torch.zeros(1))} (CPU_MATMUL={fused_lstm.CPU_MATMUL}), '
            f'OpenMP {waiting or "libgomp defaults"}, {threads or torch.get_num_threads()} threads, '
            f'load average {os.getloadavg()[0]:.1f}')


def print_table(header, rows):
    """Print a Markdown table: header and rows are tuples of strings."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for k, r in enumerate([header, *rows]):
        print('| ' + ' | '.join(v.ljust(w) for v, w in zip(r, widths)) + ' |')
        if k == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
