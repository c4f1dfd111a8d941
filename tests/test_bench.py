"""Every script in bench/ runs from its command line in its quick mode (tiny sizes, seconds),
ends by itself with exit code 0 and prints its table, so that none breaks silently.

A script is any bench/*.py with a ``__main__`` block (helper modules have none), found
here by itself: a new benchmark is tested as soon as it is added, and must take --quick.
Speed targets stay in the benchmarks: nothing here asserts a time.

    python -m pytest tests/test_bench.py -q
"""
import argparse
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


@pytest.mark.skipif(torch.cuda.is_available(), reason='runs only where there is no CUDA GPU')
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = run(os.path.join('bench', 'gpu_check.py'), cwd=tmp_path)
    assert proc.stdout.strip().count('\n') == 0 and 'no CUDA GPU' in proc.stdout, proc.stdout


def test_gpu_check_coco_pipeline_on_the_cpu(tmp_path, monkeypatch):
    """gpu_check's COCO run (build_vocab.py, resize.py, train.py, then --resume) through the
    scripts' command lines, here on the CPU at tiny sizes, with a stand-in for bench/make_coco.py
    that writes its layout: ROOT/annotations/captions_{train,val}2014.json, ROOT/{train,val}2014/."""
    monkeypatch.syspath_prepend(os.path.join(REPO, 'bench'))
    import gpu_check
    bench = tmp_path / 'bench'
    bench.mkdir()
    (bench / 'make_coco.py').write_text(
        'import argparse, sys\n'
        f'sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests")!r}]\n'
        'from conftest import make_tiny_coco\n'
        'p = argparse.ArgumentParser(); p.add_argument("--fraction"); p.add_argument("--root")\n'
        'root = p.parse_args().root\n'
        'make_tiny_coco(root, 12, size=64, split="train2014", captions_per_image=2)\n'
        'make_tiny_coco(root, 4, size=64, split="val2014", first=12)\n')
    monkeypatch.setattr(gpu_check, 'BENCH', str(bench))
    args = argparse.Namespace(device='cpu', coco_fraction=0.001, coco_steps=2, step_timeout=300)
    with open(tmp_path / 'log.txt', 'w') as log:
        check = gpu_check.Check(args, log)
        gpu_check.coco_run(check, args, str(tmp_path), extra=['--crop_size', '32', '--embed_size', '16',
                                                                '--hidden_size', '32', '--batch_size', '4',
                                                                '--num_workers', '0'])
    steps = {name: result for name, result, _, _ in check.rows}
    assert all(result == 'ok' for result in steps.values()), (check.rows, (tmp_path / 'log.txt').read_text()[-3000:])
    assert list(steps)[-1] == 'coco: --resume' and 'loss' in check.rows[-2][3]
