"""How train.py and evaluate.py end, with their default DataLoader workers, on the README's data
layout (val2014 included): by itself within seconds of the last line; on Ctrl-C (to the whole process
group, as a terminal sends it) or SIGTERM in every stage, with exit code 130 and a message that is
true; after SIGKILL; under torchrun. No run leaves a process behind (conftest.finish checks every
run), and a clean run leaves no train.lock.

A signal lands in a given stage (validation, scoring, the feature cache, a save, evaluate.py's
captioning) through a small wrapper that sends it from inside that stage's function and then runs
the function as it is.
"""
import os
import re
import shutil
import signal
import time

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import REPO, finish, make_tiny_coco, run, start, timed_lines

# TINY_MODEL's sizes, with train.py's default --num_workers (2) and --feature_cache (auto)
TRAIN = ['--encoder_weights', 'none', '--crop_size', 32, '--image_size', 48, '--embed_size', 16, '--hidden_size', 32,
         '--batch_size', 4, '--log_step', 1]
TRAIN_PY = os.path.join(REPO, 'train.py')
LAB_LINE = re.compile(r'^Epoch \[\d+/\d+\], Step \[\d+/\d+\]', re.M)
SAVED = re.compile(r'interrupted: saved (\S+) at epoch (\d+), step (\d+); continue with --resume (\S+)')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """ROOT/data as the README's steps leave it, val2014 included."""
    data = tmp_path_factory.mktemp('coco') / 'data'
    make_tiny_coco(str(data), n_images=12, split='resized2014', caption_split='train2014')
    make_tiny_coco(str(data), n_images=6, first=12, split='resizedval2014', caption_split='val2014')
    run('build_vocab.py', '--threshold', 1, cwd=data.parent)
    return data


@pytest.fixture
def root(data, tmp_path):
    shutil.copytree(data, tmp_path / 'data')
    return tmp_path


def test_ends_by_itself_within_seconds_of_its_last_line(root):
    tmp = root / 'tmp'
    tmp.mkdir()
    proc = start([TRAIN_PY, *TRAIN, '--num_epochs', 2], cwd=root, env={'TMPDIR': str(tmp)})
    lines = timed_lines(proc, timeout=240)
    finish(proc, timeout=30)
    assert proc.returncode == 0
    saved = [t for t, line in lines if line.startswith('saved models/latest.pt and models/best.pt')]
    assert saved, ''.join(line for _, line in lines)
    assert lines[-1][0] - saved[0] < 10, 'the run ends after its last line'
    assert not os.path.exists(root / 'models' / 'train.lock'), 'a clean end removes the lock'
    assert not os.listdir(tmp), "the workers' temporary folders (multiprocessing's pymp-*) are removed"


def stop_during_training(root, send, *flags):
    """Start a long run, send a signal after its third step; returns (stdout, stderr, seconds)."""
    proc = start([TRAIN_PY, *TRAIN, '--num_epochs', 50, *flags], cwd=root)
    seen = ''
    while len(LAB_LINE.findall(seen)) < 3:
        line = proc.stdout.readline()
        assert line, f'train.py ended before its third step:\n{seen}{proc.communicate()[1]}'
        seen += line
    tic = time.time()
    send(proc)
    stdout, stderr = finish(proc, timeout=60)
    return seen + stdout, stderr, time.time() - tic


SIGNALS = {
    'Ctrl-C (SIGINT to the group)': lambda proc: os.killpg(proc.pid, signal.SIGINT),
    'SIGTERM to the main process': lambda proc: proc.send_signal(signal.SIGTERM),
    'SIGTERM to the group (a cluster)': lambda proc: os.killpg(proc.pid, signal.SIGTERM),
}


@pytest.mark.parametrize('send', SIGNALS.values(), ids=SIGNALS.keys())
def test_signal_mid_epoch_saves_and_ends(root, send):
    stdout, stderr, seconds = stop_during_training(root, send)
    assert 'Traceback' not in stderr, stderr
    saved = SAVED.search(stdout)
    assert saved, stdout
    assert load_checkpoint(root / saved[1])['global_step'] >= 3
    assert seconds < 30
    assert not os.path.exists(root / 'models' / 'train.lock')


def test_sigkill_leaves_no_worker_and_a_lock_note(root):
    stdout, stderr, _ = stop_during_training(root, lambda proc: proc.kill())  # finish: no process left
    out = run('train.py', *TRAIN, '--num_epochs', 1, '--max_steps', 1, cwd=root).stdout
    assert 'models/train.lock was left by train.py pid' in out and 'taken over' in out
    again = run('train.py', *TRAIN, '--num_epochs', 1, '--max_steps', 1, cwd=root).stdout
    assert 'train.lock' not in again, 'a run that ended cleanly leaves no lock to take over'


# ---------------------------------------------------------------------------
# A signal in a given stage

WRAPPER = '''
import functools, importlib, os, signal, sys
sys.path.insert(0, {repo!r})
import {script} as script
*path, name = {where!r}.split('.')
owner = functools.reduce(getattr, path[1:], importlib.import_module(path[0]))
original, calls = getattr(owner, name), []
def signalled(*args, **kwargs):
    if not calls:
        for _ in range({times}):
            os.kill(os.getpid(), signal.SIGINT)
    calls.append(1)
    return original(*args, **kwargs)
setattr(owner, name, signalled)
script.main(sys.argv[1:])
'''


def signal_in(root, where, *flags, times=1, script='train'):
    """Run train.py (or another script's main) through a wrapper that sends itself SIGINT `times` times when `where`
    ('module.function' or 'module.Class.method') is first called; returns (stdout, stderr) of a run
    that must end with exit code 130 and no traceback."""
    wrapper = root / 'signal_wrapper.py'
    wrapper.write_text(WRAPPER.format(repo=REPO, where=where, times=times, script=script))
    args = [*TRAIN, '--num_epochs', 2, *flags] if script == 'train' else flags
    proc = start([wrapper, *args], cwd=root)
    stdout, stderr = finish(proc, timeout=120)
    assert proc.returncode == 130 and 'Traceback' not in stderr, stdout + stderr
    return stdout, stderr


def test_ctrl_c_in_validation_saves_and_resumes_exactly(root, tmp_path_factory):
    stdout, _ = signal_in(root, 'train.validate')
    saved = SAVED.search(stdout)
    steps = re.findall(r'Step \[\d+/(\d+)\]', stdout)[-1]
    assert saved and saved.group(2, 3) == ('0', steps), stdout  # all of epoch 0's steps done, its validation not
    assert 'Validation after epoch' not in stdout
    run('train.py', *TRAIN, '--num_epochs', 2, '--resume', 'models/latest.pt', cwd=root)
    resumed = load_checkpoint(root / 'models' / 'latest.pt')
    other = tmp_path_factory.mktemp('uninterrupted')
    shutil.copytree(root / 'data', other / 'data')
    run('train.py', *TRAIN, '--num_epochs', 2, cwd=other)
    uninterrupted = load_checkpoint(other / 'models' / 'latest.pt')
    assert [h['loss'] for h in resumed['history']] == [h['loss'] for h in uninterrupted['history']]
    for part in ('encoder', 'decoder'):
        for key in uninterrupted[part]:
            assert torch.equal(uninterrupted[part][key], resumed[part][key]), f'{part}.{key} differs after resume'


def test_ctrl_c_in_scoring_saves(root):
    stdout, _ = signal_in(root, 'train.select_score', '--select_by', 'bleu4')
    saved = SAVED.search(stdout)
    assert saved and os.path.isfile(root / saved[1]), stdout


def test_ctrl_c_in_the_feature_cache_build_saves_nothing(root):
    stdout, _ = signal_in(root, 'feature_cache.FeatureCache._fill')
    assert 'interrupted before training started: nothing saved' in stdout
    assert not os.path.exists(root / 'models' / 'latest.pt')
    assert not [n for _, _, names in os.walk(root) for n in names if n.endswith('.partial')]


def test_ctrl_c_during_a_save_lets_it_finish(root):
    stdout, _ = signal_in(root, 'train.save')
    saved = SAVED.search(stdout)
    assert saved, stdout
    assert load_checkpoint(root / saved[1])['step'] == 0 and saved[2] == '1'  # epoch 0 saved, validated


def test_second_ctrl_c_says_what_is_on_disk(root):
    stdout, _ = signal_in(root, 'train.save', times=2)  # the second stops the first save: nothing on disk
    assert 'interrupted again: stopped without saving; nothing was saved' in stdout, stdout
    assert not os.path.exists(root / 'models' / 'latest.pt')


def test_ctrl_c_in_evaluate_says_nothing_was_written(root):
    run('train.py', *TRAIN, '--num_epochs', 1, cwd=root)
    stdout, _ = signal_in(root, 'evaluate.caption_images', '--device', 'cpu', script='evaluate')
    assert 'interrupted: nothing written' in stdout, stdout
    assert not [n for n in os.listdir(root / 'models') if n.endswith('.json')]


def test_torchrun_two_ranks_end(root):
    command = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               TRAIN_PY, *TRAIN, '--num_epochs', 2, '--device', 'cpu']
    proc = start(command, cwd=root, env={'OMP_NUM_THREADS': '1'})
    stdout, stderr = finish(proc, timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert 'saved models/latest.pt and models/best.pt' in stdout
