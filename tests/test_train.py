"""train.py: the lab's output, checkpoints, exact resume, crashes, Ctrl-C, and two processes."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import REPO, finish, run, start, torchrun_train, train_args

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_rng_state_restores_this_process_gpu_stream():
    """The checkpoint holds the current GPU's stream only (what a torchrun rank draws from), so
    it restores on any number of GPUs."""
    import train
    torch.cuda.manual_seed_all(3)
    torch.rand(5, device='cuda')
    state = train.rng_state()
    assert isinstance(state['cuda'], torch.Tensor)
    expected = torch.rand(5, device='cuda'), torch.rand(5)
    torch.rand(7, device='cuda')
    train.set_rng_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (torch.rand(5, device='cuda'), torch.rand(5))))


def _popen_train(args):
    return start([os.path.join(REPO, 'train.py'), *args])


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
    finish(proc, timeout=60)
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
    stdout, stderr = finish(proc, timeout=120)
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
    args = train_args(tiny_coco, tiny_vocab, tmp_path / 'models', '--num_epochs', 4, '--batch_size', 2,
                      '--log_step', 1, '--learning_rate', 0.01, '--device', 'cpu')
    proc, (rank0, rank1) = torchrun_train(tmp_path, args)
    lines = LAB_LINE.findall(proc.stdout)
    # 18 captions, 9 per process, 2 per step: 4 steps an epoch (a last batch of one is dropped:
    # BatchNorm1d cannot train on it); only rank 0 prints
    assert len(lines) == 4 * 4 and lines[0][3] == '4'
    assert float(lines[-1][4]) < float(lines[0][4]), 'the loss goes down'
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


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback

@pytest.mark.parametrize('flag, value, says', [
    ('--num_workers', -1, '--num_workers must be 0 or more'),
    ('--learning_rate', -0.1, '--learning_rate must be a positive number'),
    ('--learning_rate', 0, '--learning_rate must be a positive number'),
    ('--num_layers', 0, '--num_layers must be at least 1'),
    ('--embed_size', 0, '--embed_size must be at least 1'),
    ('--hidden_size', 0, '--hidden_size must be at least 1'),
    ('--max_steps', -1, '--max_steps must be 0 or more'),
    ('--recalibrate_bn', -2, '--recalibrate_bn must be 0 or more'),
])
def test_bad_flags_are_refused_by_the_parser(flag, value, says, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.get_args([flag, str(value)])
    assert e.value.code == 2 and says in capsys.readouterr().err


def one_line_exit_2(proc, *parts):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in parts:
        assert part in proc.stderr, proc.stderr
    return proc.stderr.strip()


def test_bad_flag_through_the_command_line(tiny_coco, tiny_vocab, tmp_path):
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path), '--num_workers', -1, check=False)
    assert proc.returncode == 2 and '--num_workers must be 0 or more, got -1' in proc.stderr


def test_broken_or_foreign_resume_is_one_line(tiny_coco, tiny_vocab, tmp_path):
    (tmp_path / 'empty.pt').write_bytes(b'')
    (tmp_path / 'cut.pt').write_bytes(b'PK\x03\x04' + b'\0' * 100)  # a zip cut short, as a killed copy leaves
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / 'plain.pt')
    for name, says in (('empty.pt', 'is not a loadable checkpoint'), ('cut.pt', 'is not a loadable checkpoint'),
                       ('plain.pt', 'is not a checkpoint of train.py')):
        proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'models'), '--resume', tmp_path / name,
                   check=False)
        one_line_exit_2(proc, f'--resume: {tmp_path / name}', says)


@pytest.fixture(scope='module')
def one_step(tiny_coco, tiny_vocab, tmp_path_factory):
    """models/ after a --dry_run (one step, latest.pt and best.pt)."""
    models = tmp_path_factory.mktemp('one_step')
    run('train.py', *train_args(tiny_coco, tiny_vocab, models, '--dry_run', '--batch_size', 4))
    return models


def test_resume_takes_the_sizes_from_the_checkpoint(tiny_coco, tiny_vocab, one_step, tmp_path):
    shutil.copytree(one_step, tmp_path, dirs_exist_ok=True)
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--dry_run', '--batch_size', 4,
                                       '--hidden_size', 64, '--num_layers', 2, '--resume', tmp_path / 'latest.pt'))
    assert (f'note: --resume: {tmp_path / "latest.pt"} was trained with --hidden_size 32 (not 64), '
            f'--num_layers 1 (not 2); continuing with its sizes') in proc.stdout
    assert load_checkpoint(tmp_path / 'latest.pt')['decoder']['linear.weight'].shape[1] == 32


def test_resume_refuses_another_vocabulary(tiny_coco, tiny_vocab, one_step, tmp_path):
    from vocab import Vocabulary, load_vocab, save_vocab
    words = load_vocab(tiny_vocab).words()
    save_vocab(Vocabulary.from_words(words[:4] + words[5:] + words[4:5]), tmp_path / 'permuted.pkl')
    save_vocab(Vocabulary.from_words(words + ['zebra']), tmp_path / 'bigger.pkl')
    args = train_args(tiny_coco, tiny_vocab, tmp_path / 'models', '--resume', one_step / 'latest.pt')
    proc = run('train.py', *args, '--vocab_path', tmp_path / 'permuted.pkl', check=False)
    one_line_exit_2(proc, 'does not give the words the ids', f'{words[5]!r} is 5 there, 4 here',
                    'pass the vocab.pkl it was trained with')
    proc = run('train.py', *args, '--vocab_path', tmp_path / 'bigger.pkl', check=False)
    one_line_exit_2(proc, f'a vocabulary of {len(words)} words', f'has {len(words) + 1}')
    assert not os.path.exists(tmp_path / 'models' / 'latest.pt')


def test_a_bad_caption_file_is_one_line(tiny_coco, tiny_vocab, tmp_path):
    (tmp_path / 'list.json').write_text('[]')
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'models'), '--caption_path',
               tmp_path / 'list.json', check=False)
    one_line_exit_2(proc, 'list.json')
    assert not os.path.exists(tmp_path / 'models' / 'latest.pt')


# ---------------------------------------------------------------------------
# Faults: keep running where possible, stop with one line where not, never lose a checkpoint

def test_two_runs_into_one_model_path(tiny_coco, tiny_vocab, tmp_path):
    first = _popen_train(train_args(tiny_coco, tiny_vocab, tmp_path, '--num_epochs', 50, '--batch_size', 4,
                                    '--log_step', 1))
    try:
        _read_until(first, LAB_LINE.pattern, 1)
        proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--dry_run'), check=False)
        one_line_exit_2(proc, f'--model_path {tmp_path} is in use by another train.py run (pid {first.pid}')
    finally:
        first.send_signal(signal.SIGINT)
        finish(first, timeout=300)
    assert first.returncode == 130


def test_stale_lock_and_temporaries_are_taken_over(tiny_coco, tiny_vocab, tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()  # a pid no process has now
    (tmp_path / 'train.lock').write_text(f'{dead.pid}\n')
    for name in (f'.latest.pt.{dead.pid}.tmp', 'latest.pt.k2j3h4.tmp', 'best.pt.tmp'):
        (tmp_path / name).write_bytes(b'half a checkpoint')
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--dry_run', '--batch_size', 4)).stdout
    assert f'was left by train.py pid {dead.pid}, which is no longer running: taken over' in out
    assert 'removed 3 temporary file(s) of an interrupted save' in out
    assert sorted(os.listdir(tmp_path)) == ['best.pt', 'latest.pt', 'train_log.csv', 'train_log.png']  # lock removed
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ('latest.pt', 'best.pt', 'train_log.csv')}
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a small tmpfs of its own (needs root); returns a function that mounts it."""
    folder = tmp_path / 'disk'
    folder.mkdir()
    mounted = []
    def mount(kib, options=''):
        proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={kib}k{options}', 'tmpfs', str(folder)],
                              capture_output=True)
        if proc.returncode:
            pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.decode().strip()}')
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(['umount', str(folder)])


def test_full_disk_keeps_the_previous_checkpoint(tiny_coco, tiny_vocab, one_step, small_disk):
    from utils import file_sha256
    need = sum(os.path.getsize(one_step / n) for n in os.listdir(one_step))
    disk = small_disk(need // 1024 + 64)  # room for what is there, not for a second latest.pt beside it
    for name in os.listdir(one_step):
        shutil.copy(one_step / name, disk / name)
    before = file_sha256(disk / 'latest.pt')
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, disk, '--batch_size', 4, '--num_epochs', 1,
                                       '--resume', disk / 'latest.pt'), check=False)
    line = one_line_exit_2(proc, f'cannot write {disk / "latest.pt"}', f'the previous {disk / "latest.pt"} is intact',
                           f'--resume {disk / "latest.pt"}')
    assert 'is the disk full' in line or 'No space left on device' in line
    assert file_sha256(disk / 'latest.pt') == before and load_checkpoint(disk / 'latest.pt')['global_step'] == 1
    assert not [n for n in os.listdir(disk) if n.endswith('.tmp')], 'no temporary file is left'


def test_read_only_model_path_is_refused_before_training(tiny_coco, tiny_vocab, tmp_path, small_disk):
    if os.geteuid() == 0:
        folder = small_disk(64, ',ro')
    else:
        folder = tmp_path / 'ro'
        folder.mkdir(mode=0o555)
    proc = run('train.py', *train_args(tiny_coco, tiny_vocab, folder), check=False)
    one_line_exit_2(proc, f'cannot write in --model_path {folder}', 'pass a folder you can write to')
    assert 'Epoch [' not in proc.stdout, 'refused before training'


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_while_setting_up_exits_130(tiny_coco, tiny_vocab, tmp_path, signum):
    proc = _popen_train(train_args(tiny_coco, tiny_vocab, tmp_path, '--augment', 'none'))
    assert proc.stdout.readline().startswith('{')  # its arguments: the model is built next
    proc.send_signal(signum)
    stdout, stderr = finish(proc, timeout=300)
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    assert 'interrupted' in stdout
    features = tiny_coco[0] + '/../features'
    assert not [n for n in os.listdir(features) if n.endswith('.partial')] if os.path.isdir(features) else True


@pytest.fixture(scope='module')
def uninterrupted(tiny_coco, tiny_vocab, tmp_path_factory):
    models = tmp_path_factory.mktemp('uninterrupted')
    run('train.py', *train_args(tiny_coco, tiny_vocab, models, '--num_epochs', 2, '--batch_size', 4))
    return load_checkpoint(models / 'latest.pt')


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_then_resume_is_exact(tiny_coco, tiny_vocab, tmp_path, uninterrupted, signum):
    """The signal lands inside a step (the ResNet's forward is most of one): the run stops after
    that step, and the resumed run ends bit-identical to one never stopped."""
    args = train_args(tiny_coco, tiny_vocab, tmp_path, '--num_epochs', 2, '--batch_size', 4, '--log_step', 1)
    proc = _popen_train(args)
    _read_until(proc, LAB_LINE.pattern, 3)
    proc.send_signal(signum)
    stdout, stderr = finish(proc, timeout=300)
    assert proc.returncode == 130 and 'interrupted: saved' in stdout and 'Traceback' not in stderr
    run('train.py', *args, '--resume', tmp_path / 'latest.pt')
    resumed = load_checkpoint(tmp_path / 'latest.pt')
    assert resumed['global_step'] == uninterrupted['global_step']
    for part in ('encoder', 'decoder'):
        for key in uninterrupted[part]:
            assert torch.equal(uninterrupted[part][key], resumed[part][key]), f'{part}.{key} differs after resume'


def test_best_pt_catches_up_after_a_kill_before_its_copy(tiny_coco, tiny_vocab, tmp_path):
    """SIGKILL between latest.pt and its best.pt copy leaves an older best.pt: the resume repairs it."""
    common = ['--batch_size', 4, '--learning_rate', 0.01]
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, *common, '--num_epochs', 1))
    shutil.copy(tmp_path / 'best.pt', tmp_path / 'older.pt')
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, *common, '--num_epochs', 2,
                                '--resume', tmp_path / 'latest.pt'))
    latest = load_checkpoint(tmp_path / 'latest.pt')
    assert latest['best']['global_step'] == latest['global_step'], 'epoch 1 is the best (else nothing to repair)'
    os.replace(tmp_path / 'older.pt', tmp_path / 'best.pt')  # as if killed before the copy
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, *common, '--num_epochs', 2,
                                      '--resume', tmp_path / 'latest.pt')).stdout
    assert f'note: {tmp_path / "best.pt"} was not the best model' in out
    assert load_checkpoint(tmp_path / 'best.pt')['best'] == latest['best']
