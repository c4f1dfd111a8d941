"""Bad input through the command line a user runs: exit code 2, one line on stderr naming the
problem (and the fix), no traceback, nothing half-written."""
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO, make_tiny_coco, run, train_args


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


def written(folder):
    """What a failed run left in `folder`: its files, but for train.py's lock (train.py's own tests cover it)."""
    return [f for f in files_under(folder) if f != 'train.lock'] if os.path.isdir(folder) else []


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


def test_sample_names_its_model_on_stderr_and_takes_odd_pictures_and_both_length_flags(tiny, tmp_path):
    image_dir, _, _, models = tiny
    Image.new('RGB', (1, 1), 'red').save(tmp_path / 'dot.png')
    Image.new('RGB', (10, 4000), 'blue').save(tmp_path / 'pole.png')
    pictures = [os.path.join(image_dir, 'img_000.png'), tmp_path / 'dot.png', tmp_path / 'pole.png']
    proc = run('sample.py', '--image', *pictures, '--model_path', models, '--max_seq_length', 3,
               '--output', tmp_path / 'shown')
    assert proc.stderr.startswith('model: ') and models in proc.stderr.splitlines()[0], proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(': ')[0] for line in lines[:3]] == [str(p) for p in pictures], 'stdout holds the captions'
    assert all(len(line.split(': ')[1].split()) <= 3 for line in lines[:3]), lines
    assert sorted(os.listdir(tmp_path / 'shown')) == ['dot_caption.png', 'img_000_caption.png', 'pole_caption.png']
    assert Image.open(tmp_path / 'shown' / 'pole_caption.png').height <= 1100, 'a tall picture is scaled down'
    old = run('sample.py', '--image', *pictures, '--model_path', models, '--max_length', 3)
    assert old.stdout.splitlines() == lines[:3], '--max_length is the old name of --max_seq_length'


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


# ---------------------------------------------------------------------------
# resize.py


def complete(path):
    """Does the picture at `path` decode to its end?"""
    with Image.open(path) as image:
        image.load()
    return True


def test_resize_full_disk_leaves_only_complete_pictures(tmp_path):
    src = tmp_path / 'raw'
    src.mkdir()
    for i in range(40):
        Image.effect_noise((96, 96), 60 + i).convert('RGB').save(src / f'{i:02d}.jpg', quality=95)
    with tmpfs(tmp_path / 'full', size='64k') as out:
        proc = run('resize.py', '--image_dir', src, '--output_dir', out, '--image_size', 64, '--num_workers', 2,
                   check=False)
        one_line(proc, f'cannot write {out}', 'No space left on device', 'run the same command again')
        names = os.listdir(out)
        assert names and not [n for n in names if n.startswith('.')], 'no temporary file left'
        assert all(complete(os.path.join(out, n)) for n in names), 'no truncated picture under its final name'


def test_resize_workers_die_with_a_killed_main_process(tmp_path):
    src, out = tmp_path / 'raw', tmp_path / 'out'
    src.mkdir()
    picture = Image.linear_gradient('L').resize((900, 900)).convert('RGB')
    for i in range(160):
        picture.save(src / f'{i:03d}.jpg')
    command = ['resize.py', '--image_dir', src, '--output_dir', out, '--image_size', 200, '--num_workers', 2]
    proc = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out.is_dir() and len(os.listdir(out)) >= 2):
            time.sleep(0.02)
        workers = [int(p) for p in subprocess.run(['ps', '-o', 'pid=', '--ppid', str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert workers, 'resize.py runs a pool'
    finally:
        proc.kill()
        proc.wait()
    time.sleep(1)
    written = len(os.listdir(out))
    assert written < 160, 'killed before it finished'
    running = [pid for pid in workers if alive(pid)]
    time.sleep(1)
    assert not running and len(os.listdir(out)) == written, 'the workers stopped with the main process'


def alive(pid):
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except FileNotFoundError:
        return False


def test_resize_keeps_an_animated_gif_and_skips_broken_and_odd_pictures(tmp_path):
    src, out = tmp_path / 'raw', tmp_path / 'out'
    src.mkdir()
    frames = [Image.new('RGB', (30, 20), colour) for colour in ('red', 'blue', 'green')]
    frames[0].save(src / 'moving.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
    (src / 'empty.jpg').write_bytes(b'')
    Image.new('RGB', (1, 1), 'red').save(src / 'dot.png')
    Image.new('RGB', (10, 4000), 'blue').save(src / 'pole.png')
    args = ['--image_dir', src, '--output_dir', out, '--image_size', 24, '--num_workers', 0]
    proc = run('resize.py', *args)
    assert 'Resized 3 images, skipped 0 (already done), 1 not images/corrupt: empty.jpg' in proc.stdout
    assert sorted(os.listdir(out)) == ['dot.png', 'moving.gif', 'pole.png']
    assert all(Image.open(out / n).size == (24, 24) for n in os.listdir(out))
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    proc = run('resize.py', *args)
    assert 'Resized 0 images, skipped 3 (already done), 1 not images/corrupt' in proc.stdout
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before, 'the GIF is not redone'


# ---------------------------------------------------------------------------
# Caption files: build_vocab.py, train.py and evaluate.py read them through data_loader.load_coco

GOOD_IMAGES = [{'id': 100 + i, 'file_name': f'img_{i:03d}.png'} for i in range(6)]
BAD_CAPTION_FILES = {
    'truncated': ('{"images": [{"id": 100, "file_name": "img_000.png"}], "annotations": [{"id": 1, "caption": "a d',
                  ['not valid JSON', 'truncated?', 'annotations_trainval2014.zip']),
    'a list': (json.dumps([{'id': 1, 'caption': 'a dog'}]), ['expected a JSON object', 'got a list']),
    'no annotations key': (json.dumps({'images': GOOD_IMAGES}), ["no 'annotations' list"]),
    'unknown image_id': (json.dumps({'images': GOOD_IMAGES, 'annotations': [
        {'id': 1, 'image_id': 100, 'caption': 'a dog'}, {'id': 2, 'image_id': 424242, 'caption': 'a cat'}]}),
        ['annotation 2', 'image_id 424242', 'not among its 6 images']),
    'no captions': (json.dumps({'images': GOOD_IMAGES, 'annotations': []}), ["'annotations' list is empty"]),
}
# each script with the cases it is tried on (every subprocess costs seconds)
SCRIPT_CASES = [('build_vocab.py', case) for case in BAD_CAPTION_FILES] + \
               [('train.py', 'truncated'), ('train.py', 'no captions'), ('evaluate.py', 'unknown image_id')]


@pytest.mark.parametrize('script,case', SCRIPT_CASES)
def test_bad_caption_file_is_one_line(tiny, tmp_path, script, case):
    image_dir, _, vocab, _ = tiny
    content, words = BAD_CAPTION_FILES[case]
    bad = tmp_path / 'captions_train2014.json'
    bad.write_text(content)
    out = tmp_path / 'out'
    args = {'build_vocab.py': ['--caption_path', bad, '--vocab_path', out / 'vocab.pkl'],
            'train.py': [*train_args((image_dir, str(bad)), vocab, out, '--dry_run')],
            'evaluate.py': ['--caption_path', bad, '--image_dir', image_dir, '--model_path', tiny[3],
                            '--results_path', out / 'results.json', '--device', 'cpu']}[script]
    one_line(run(script, *args, check=False), f'{script}: error: ', str(bad), *words)
    assert not written(out), 'nothing written'


def resized_copy(image_dir, folder, keep):
    """A resized folder holding only the pictures named in `keep` (as after resize.py skipped the others)."""
    os.makedirs(folder)
    for name in keep:
        os.symlink(os.path.join(image_dir, name), os.path.join(folder, name))
    return str(folder)


def test_train_skips_a_few_missing_pictures_and_refuses_most(tiny, tmp_path):
    image_dir, caption_path, vocab, _ = tiny
    names = sorted(os.listdir(image_dir))
    few = resized_copy(image_dir, tmp_path / 'few', names[1:])  # resize.py skipped one corrupt picture
    proc = run('train.py', *train_args((few, caption_path), vocab, tmp_path / 'm1', '--dry_run'))
    notes = [line for line in proc.stderr.splitlines() if line.startswith('note: 1 of 6 pictures')]
    assert len(notes) == 1 and os.path.join(few, names[0]) in notes[0], proc.stderr
    most = resized_copy(image_dir, tmp_path / 'most', names[:2])
    proc = run('train.py', *train_args((most, caption_path), vocab, tmp_path / 'm2', '--dry_run'), check=False)
    one_line(proc, f'4 of 6 pictures of {caption_path} are not in {most}: resize them first: python resize.py',
             f'--output_dir {most}')


def test_train_crop_larger_than_the_pictures(tiny, tmp_path):
    image_dir, caption_path, vocab, _ = tiny
    small = tmp_path / 'resized40'
    run('resize.py', '--image_dir', image_dir, '--output_dir', small, '--image_size', 40, '--num_workers', 0)
    proc = run('train.py', *train_args((str(small), caption_path), vocab, tmp_path / 'models', '--dry_run'),
               '--crop_size', 48, '--image_size', 256, check=False)
    one_line(proc, 'are 40 x 40', 'smaller than the 48 x 48 crop', '--crop_size 40 or less')
    assert not written(tmp_path / 'models'), 'nothing written'


# ---------------------------------------------------------------------------
# evaluate.py


def test_evaluate_results_on_a_read_only_disk(tiny, tmp_path):
    image_dir, caption_path, _, models = tiny
    with tmpfs(tmp_path / 'ro', read_only=True) as folder:
        proc = run('evaluate.py', '--caption_path', caption_path, '--image_dir', image_dir, '--model_path', models,
                   '--results_path', folder / 'results.json', '--device', 'cpu', '--num_workers', 0, check=False)
        one_line(proc, f'cannot write {folder / "results.json"}', '--results_path')
        assert 'model:' not in proc.stdout, 'checked before the model is loaded'
