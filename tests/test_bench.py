"""Every script in bench/ runs from its command line in its quick mode (tiny sizes, seconds),
ends by itself with exit code 0 and prints its table, so that none breaks silently.

A script is any bench/*.py with a ``__main__`` block (helper modules have none), found
here by itself: a new benchmark is tested as soon as it is added, and must take --quick.
Speed targets stay in the benchmarks: nothing here asserts a time.

    python -m pytest tests/test_bench.py -q
"""
import glob
import os

import pytest
import torch

from conftest import REPO, run


def bench_scripts():
    paths = sorted(glob.glob(os.path.join(REPO, 'bench', '*.py')))
    return [os.path.basename(p) for p in paths if "if __name__ == '__main__':" in open(p).read()]


def test_the_benchmarks_are_found():
    assert {'bench_lstm.py', 'bench_train.py', 'bench_share.py', 'gpu_check.py'} <= set(bench_scripts())


@pytest.mark.parametrize('script', bench_scripts())
def test_bench_script_runs_in_quick_mode(script, tmp_path):
    proc = run(os.path.join('bench', script), '--quick', cwd=tmp_path, timeout=600)
    lines = proc.stdout.splitlines()
    if script == 'gpu_check.py' and not torch.cuda.is_available():
        return                                          # its one line: test_gpu_check_without_a_gpu
    if script.startswith('bench_') or script == 'gpu_check.py':
        # a Markdown table: a header row, its rule, at least one row
        rule = next((k for k, line in enumerate(lines) if line.startswith('|-')), None)
        assert rule is not None and rule > 0 and lines[rule - 1].startswith('| '), proc.stdout
        assert len(lines) > rule + 1 and lines[rule + 1].startswith('| '), proc.stdout
    else:
        assert proc.stdout.strip(), f'{script} --quick printed nothing'


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA GPU')
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = run(os.path.join('bench', 'gpu_check.py'), cwd=tmp_path)
    assert proc.stdout.strip().count('\n') == 0 and 'no CUDA GPU' in proc.stdout, proc.stdout
