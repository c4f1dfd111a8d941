"""train.py: the lab's output, checkpoints, exact resume, crashes, Ctrl-C, and two processes."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import REPO, run, train_args

LAB_LINE = re.compile(r'^Epoch \[(\d+)/(\d+)\], Step \[(\d+)/(\d+)\], Loss: (\d+\.\d{4}), Perplexity: (\d+\.\d{4})$', re.M)


def test_prints_the_lab_lines_and_writes_checkpoints(tiny_coco, tiny_vocab, tmp_path):
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--num_epochs', 2, '--batch_size', 4,
                                      '--log_step', 1, '--learning_rate', 0.01)).stdout
    assert out.startswith('{'), 'prints its arguments first'
    lines = LAB_LINE.findall(out)
    # 12 pictures, every 5th held out (3), 18 captions left: ceil(18/4) = 5 steps an epoch
    assert [(e, s) for e, _, s, _, _, _ in lines] == [(str(e), str(s)) for e in range(2) for s in range(5)]
    assert all(total == '2' and steps == '5' for _, total, _, steps, _, _ in lines)
    assert float(lines[-1][4]) < float(lines[0][4]), 'the loss goes down'
    assert out.count('Validation after epoch') == 2
    for name in ('latest.pt', 'best.pt', 'train_log.csv', 'train_log.png'):
        assert os.path.getsize(tmp_path / name) > 0, name
    ckpt = load_checkpoint(tmp_path / 'latest.pt')  # weights_only=True
    assert not any(k.startswith('resnet.') for k in ckpt['encoder']), 'the frozen ResNet is not stored'
    assert os.path.getsize(tmp_path / 'latest.pt') < 2_000_000
    assert (ckpt['epoch'], ckpt['step'], ckpt['global_step']) == (2, 0, 10)
    assert ckpt['vocab'][:4] == ['<pad>', '<start>', '<end>', '<unk>']


def test_resume_continues_exactly(tiny_coco, tiny_vocab, tmp_path):
    """Stopped after 7 steps and resumed, a run ends with the same weights as one never stopped."""
    common = ['--num_epochs', 2, '--batch_size', 4, '--learning_rate', 0.01]
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'a', *common))
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'b', *common, '--max_steps', 7))
    stopped = load_checkpoint(tmp_path / 'b' / 'latest.pt')
    assert (stopped['epoch'], stopped['step']) == (1, 2)
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'b', *common,
                                      '--resume', tmp_path / 'b' / 'latest.pt')).stdout
    assert 'resumed from' in out and 'epoch 1, step 2' in out
    a, b = load_checkpoint(tmp_path / 'a' / 'latest.pt'), load_checkpoint(tmp_path / 'b' / 'latest.pt')
    assert a['global_step'] == b['global_step'] == 10
    for part in ('encoder', 'decoder'):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f'{part}.{key} differs after resume'


def _popen_train(args):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc, pattern, count, timeout=120):
    """Read proc's stdout until `pattern` matched `count` times; returns the text read."""
    text, deadline = '', time.time() + timeout
    while len(re.findall(pattern, text, re.M)) < count:
        line = proc.stdout.readline()
        assert line and time.time() < deadline, f'train.py ended or stalled:\n{text}\n{proc.stderr.read()}'
        text += line
    return text


def test_sigkill_mid_epoch_loses_at_most_save_step(tiny_coco, tiny_vocab, tmp_path):
    args = train_args(tiny_coco, tiny_vocab, tmp_path, '--num_epochs', 3, '--batch_size', 4, '--log_step', 1,
                      '--save_step', 2)
    proc = _popen_train(args)
    text = _read_until(proc, LAB_LINE.pattern, 8)  # well into epoch 1
    proc.kill()  # SIGKILL: no handler runs, a save may be cut anywhere
    proc.wait()
    epoch, _, step, steps, _, _ = LAB_LINE.findall(text)[-1]
    trained = int(epoch) * int(steps) + int(step) + 1  # steps finished before the kill (at least)
    for name in os.listdir(tmp_path):
        if name.endswith('.pt'):
            load_checkpoint(tmp_path / name)  # every checkpoint on disk loads
    out = run('train.py', *args, '--resume', tmp_path / 'latest.pt').stdout
    e, s = map(int, re.search(r'resumed from .*: epoch (\d+), step (\d+)', out).groups())
    assert 0 <= trained - (e * int(steps) + s) <= 2, 'at most --save_step steps are redone'
    assert load_checkpoint(tmp_path / 'latest.pt')['global_step'] == 15


def test_ctrl_c_saves_and_exits_cleanly(tiny_coco, tiny_vocab, tmp_path):
    proc = _popen_train(train_args(tiny_coco, tiny_vocab, tmp_path, '--num_epochs', 50, '--batch_size', 4,
                                   '--log_step', 1, '--save_step', 1000))
    _read_until(proc, LAB_LINE.pattern, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert 'interrupted: saved' in stdout and 'Traceback' not in stderr
    ckpt = load_checkpoint(tmp_path / 'latest.pt')
    assert ckpt['global_step'] >= 3


def test_bad_input_one_line_exit_2(tiny_coco, tiny_vocab, tmp_path):
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path), '--vocab_path', tmp_path / 'nope.pkl',
               check=False)
    assert proc.returncode == 2 and 'build_vocab.py' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path), '--batch_size', 0, check=False)
    assert proc.returncode == 2 and '--batch_size' in proc.stderr
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path), '--resume', tmp_path / 'nope.pt',
               check=False)
    assert proc.returncode == 2 and 'nope.pt' in proc.stderr and 'Traceback' not in proc.stderr


def test_two_processes_ddp_gloo(tiny_coco, tiny_vocab, tmp_path):
    """torchrun with 2 CPU processes: both end with the same weights, and the loss goes down."""
    wrapper = tmp_path / 'ddp_main.py'
    wrapper.write_text(
        'import os, sys, torch\n'
        f'sys.path.insert(0, {REPO!r})\n'
        'import train\n'
        'model = train.main(sys.argv[1:])\n'
        f'torch.save(dict(model.named_parameters()), os.path.join({str(tmp_path)!r}, f"rank{{os.environ[\'RANK\']}}.pt"))\n')
    args = train_args(tiny_coco, tiny_vocab, tmp_path / 'models', '--num_epochs', 4, '--batch_size', 2,
                      '--log_step', 1, '--learning_rate', 0.01, '--device', 'cpu')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(wrapper), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = LAB_LINE.findall(proc.stdout)
    # 18 captions, 9 per process, 2 per step: 4 steps an epoch (a last batch of one is dropped:
    # BatchNorm1d cannot train on it); only rank 0 prints
    assert len(lines) == 4 * 4 and lines[0][3] == '4'
    assert float(lines[-1][4]) < float(lines[0][4]), 'the loss goes down'
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f'{name} differs between the ranks'
    assert os.path.isfile(tmp_path / 'models' / 'latest.pt')


def test_best_checkpoint_by_bleu4(tiny_coco, tiny_vocab, tmp_path):
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--num_epochs', 2, '--batch_size', 4,
                                      '--learning_rate', 0.01, '--select_by', 'bleu4', '--augment', 'none',
                                      '--feature_cache_dir', tmp_path / 'features')).stdout
    scores = [float(s) for s in re.findall(r'bleu4: (\d+\.\d+)', out)]
    assert len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    best = load_checkpoint(tmp_path / 'best.pt')['best']
    assert best['score'] == pytest.approx(max(scores), abs=0.01)
    assert best['epoch'] == scores.index(max(scores))


def test_amp_bf16_step(tiny_coco, tiny_vocab, tmp_path):
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--dry_run', '--amp', 'bf16',
                                      '--batch_size', 4, '--log_step', 1)).stdout
    loss = float(LAB_LINE.findall(out)[0][4])
    assert 0 < loss < 20
    assert load_checkpoint(tmp_path / 'latest.pt')['global_step'] == 1
