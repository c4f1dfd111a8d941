"""Bad input through the command line a user runs: exit code 2, one line on stderr naming the
problem (and the fix), no traceback, nothing half-written."""
import contextlib
import json
import os
import subprocess

import pytest
from PIL import Image

from conftest import make_tiny_coco, run, train_args


def one_line(proc, *words):
    """The line a bad input must end in: exit code 2, exactly one line on stderr holding `words`."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in proc.stderr, \
        f'exit {proc.returncode}\nstderr:\n{proc.stderr}'
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def files_under(folder):
    """Every file below `folder` (temporaries included), relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@contextlib.contextmanager
def tmpfs(folder, size='1m', read_only=False):
    """Mount a small tmpfs on `folder` (a full disk, or a read-only one); skip where mounting is not allowed."""
    os.makedirs(folder, exist_ok=True)
    options = f'size={size}' + (',ro' if read_only else '')
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip('needs permission to mount a tmpfs')
    try:
        yield folder
    finally:
        subprocess.run(['umount', '-l', str(folder)], capture_output=True)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny COCO set, its vocabulary and a one-step model: (image_dir, caption_path, vocab, models)."""
    root = tmp_path_factory.mktemp('bad_input')
    image_dir, caption_path = make_tiny_coco(str(root / 'coco'), n_images=6)
    vocab = str(root / 'vocab.pkl')
    run('build_vocab.py', '--caption_path', caption_path, '--vocab_path', vocab, '--threshold', 1)
    models = str(root / 'models')
    run('train.py', *train_args((image_dir, caption_path), vocab, models, '--dry_run'))
    return image_dir, caption_path, vocab, models


# ---------------------------------------------------------------------------
# sample.py


def test_sample_names_its_model_on_stderr_and_takes_both_length_flags(tiny):
    image_dir, _, _, models = tiny
    picture = os.path.join(image_dir, 'img_000.png')
    proc = run('sample.py', '--image', picture, '--model_path', models, '--max_seq_length', 3)
    assert proc.stderr.startswith('model: ') and models in proc.stderr.splitlines()[0], proc.stderr
    assert len(proc.stdout.split()) <= 3 and 'model' not in proc.stdout, 'stdout holds only the caption'
    old = run('sample.py', '--image', picture, '--model_path', models, '--max_length', 3)
    assert old.stdout == proc.stdout, '--max_length is the old name of --max_seq_length'


def test_sample_folder_without_pictures(tiny, tmp_path):
    (tmp_path / 'notes.txt').write_text('no pictures here')
    one_line(run('sample.py', '--image', tmp_path, '--model_path', tiny[3], check=False), 'no pictures in', str(tmp_path))


def test_sample_output_that_cannot_be_written(tiny, tmp_path):
    picture = os.path.join(tiny[0], 'img_000.png')
    (tmp_path / 'file').write_text('a file, not a folder')
    proc = run('sample.py', '--image', picture, '--model_path', tiny[3], '--output', tmp_path / 'file' / 'out',
               check=False)
    one_line(proc, 'cannot write into --output', 'not a folder')
    with tmpfs(tmp_path / 'ro', read_only=True) as folder:
        proc = run('sample.py', '--image', picture, '--model_path', tiny[3], '--output', folder, check=False)
        one_line(proc, f'cannot write into --output {folder}', 'Read-only file system')
        assert 'model:' not in proc.stderr, 'checked before the model is loaded'


def test_sample_full_disk_leaves_no_half_picture(tiny, tmp_path):
    # a big picture: its captioned PNG does not fit in 8 KiB
    Image.effect_noise((512, 512), 100).convert('RGB').save(tmp_path / 'noise.png')
    with tmpfs(tmp_path / 'full', size='8k') as folder:
        proc = run('sample.py', '--image', tmp_path / 'noise.png', '--model_path', tiny[3], '--output', folder,
                   check=False)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        assert f'cannot write {folder}' in proc.stderr.strip().splitlines()[-1]
        assert os.listdir(folder) == [], 'no truncated picture, no temporary file'
