"""Shared fixtures: a tiny COCO-format caption set the tests make themselves.

    tiny_coco/
        train2014/img_000.png ...        small pictures: one coloured square on a coloured background
        annotations/captions_train2014.json   COCO layout: images, annotations (2 captions each)
"""
import cpu_env  # noqa: F401  (first: the tests' own torch waits as the scripts' does)
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tutorial's class, verbatim (yunjey/pytorch-tutorial image_captioning/build_vocab.py)
TUTORIAL_VOCABULARY = '''
class Vocabulary(object):
    """Simple vocabulary wrapper."""
    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}
        self.idx = 0

    def add_word(self, word):
        if not word in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        if not word in self.word2idx:
            return self.word2idx['<unk>']
        return self.word2idx[word]

    def __len__(self):
        return len(self.word2idx)
'''

COLOURS = {'red': (220, 30, 30), 'green': (30, 180, 60), 'blue': (40, 60, 220), 'yellow': (240, 220, 40)}
PLACES = {'left': (0.05, 0.3), 'right': (0.55, 0.3), 'top': (0.3, 0.05), 'bottom': (0.3, 0.55)}


def make_tiny_coco(root, n_images=12, size=48, split='train2014', captions_per_image=2, first=0,
                   caption_split=None):
    """Write n_images (first + n_images <= 48) pictures and their captions in COCO's layout.

    Every picture is a different scene (square colour, background colour, place), so a
    model can tell them apart even through a randomly initialised ResNet. `first` skips
    that many scenes (a validation split of other pictures); the pictures go to root/split
    and the captions to root/annotations/captions_{caption_split or split}.json.
    Returns (image_dir, caption_path).
    """
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    scenes = [(fg, bg, place) for place in PLACES for fg in COLOURS for bg in COLOURS if bg != fg]
    random.Random(0).shuffle(scenes)
    images, annotations = [], []
    for i, (fg, bg, place) in enumerate(scenes[first:first + n_images], start=first):
        picture = Image.new('RGB', (size, size), COLOURS[bg])
        x, y = (int(f * size) for f in PLACES[place])
        picture.paste(COLOURS[fg], (x, y, x + size * 2 // 5, y + size * 2 // 5))
        name = f'img_{i:03d}.png'
        picture.save(os.path.join(image_dir, name))
        images.append({'id': 100 + i, 'file_name': name, 'width': size, 'height': size})
        texts = [f'a {fg} square on the {place} of a {bg} picture.', f'A {fg} square at the {place}, {bg} background']
        for j, text in enumerate(texts[:captions_per_image]):
            annotations.append({'id': 1000 + 10 * i + j, 'image_id': 100 + i, 'caption': text})
    caption_path = os.path.join(root, 'annotations', f'captions_{caption_split or split}.json')
    with open(caption_path, 'w') as f:
        json.dump({'info': {}, 'licenses': [], 'images': images, 'annotations': annotations}, f)
    return image_dir, caption_path


def group_processes(pgid):
    """Pids of the live processes in process group `pgid` (zombies, already ended, left out)."""
    pids = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()  # after '(comm)', which may hold spaces
        except (OSError, IndexError):
            continue
        if entry.isdigit() and fields[0] != 'Z' and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def start(command, cwd=REPO, **kwargs):
    """Popen a script (a list: [path, *args] run by this Python) in a process group of its own,
    so that finish() can see every process it made. Text stdout and stderr, unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', **kwargs.pop('env', {}))
    return subprocess.Popen([sys.executable, *map(str, command)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs)


def finish(proc, timeout=600, grace=10):
    """Wait for a process of start(): it must end by itself within `timeout` seconds, and leave no
    process of its group (a DataLoader or Pool worker) alive `grace` seconds later. Returns
    (stdout, stderr); on failure kills the group and raises AssertionError with the output."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a worker holding the pipes open counts as not ended too
        alive = group_processes(proc.pid)
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        raise AssertionError(f'{proc.args[1]} did not end within {timeout} s (exit code {proc.poll()}; '
                             f'processes of its group: {alive})\nstdout:\n{stdout}\nstderr:\n{stderr}')
    deadline = time.time() + grace
    while group_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = group_processes(proc.pid)
    if left:
        _kill_group(proc.pid)
        raise AssertionError(f'{proc.args[1]} exited {proc.returncode} but left processes {left} running'
                             f'\nstdout:\n{stdout}\nstderr:\n{stderr}')
    return stdout, stderr


def timed_lines(proc, timeout):
    """[(seconds since the call, line), ...] of proc's stdout until it closes (all of proc's
    processes ended), read by a thread; kills proc's group and fails after `timeout` seconds."""
    import threading
    lines, t0 = [], time.time()
    reader = threading.Thread(target=lambda: lines.extend((time.time() - t0, line) for line in proc.stdout),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        _kill_group(proc.pid)
        raise AssertionError(f'{proc.args[1]}: stdout still open after {timeout} s (a process of its group lives on):\n'
                             + ''.join(line for _, line in lines))
    return lines


def _kill_group(pgid):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run(script, *args, cwd=REPO, check=True, timeout=600):
    """Run one of the repository's scripts through its command line, as a user would: it must end
    by itself and leave no process behind (see finish)."""
    proc = start([os.path.join(REPO, script), *args], cwd=cwd)
    stdout, stderr = finish(proc, timeout)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} exited {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}')
    return proc


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (given to every test skipped without one): '
                                       'bench/gpu_check.py runs `pytest -m cuda`')


def pytest_terminal_summary(terminalreporter):
    """Ends every run, -q included, with the machine its results hold for: the CPU, and the matmul
    libraries my_LSTM's fused path can call here (each is tested; the default is the vendor's)."""
    import torch

    import fused_lstm
    from bench.report import cpu_name
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'
    terminalreporter.write_line(
        f'machine: {cpu_name()}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}; '
        f"my_LSTM's CPU matmul libraries: {', '.join(fused_lstm.cpu_matmuls())} (the default here: "
        f"{fused_lstm.cpu_matmul(torch.zeros(1))})")


def pytest_collection_modifyitems(config, items):
    # a test skipped for want of a GPU ("needs a CUDA device", "needs a GPU") is a CUDA test, whatever its name
    for item in items:
        reasons = [m.kwargs.get('reason', '').lower() for m in item.iter_markers('skipif')]
        if any(r.startswith('needs a') and ('cuda' in r or 'gpu' in r) for r in reasons):
            item.add_marker('cuda')


def torchrun_train(tmp_path, args, nproc=2):
    """`torchrun --nproc_per_node=nproc train.py ARGS` on the CPU (gloo), one thread a process; it
    must end by itself and leave no process (finish). Returns (CompletedProcess, [each rank's
    named_parameters() at the end, as tensors])."""
    wrapper = tmp_path / 'ddp_main.py'
    wrapper.write_text(
        'import os, sys, torch\n'
        f'sys.path.insert(0, {REPO!r})\n'
        'import train\n'
        'model = train.main(sys.argv[1:])\n'
        f'torch.save(dict(model.named_parameters()), os.path.join({str(tmp_path)!r}, f"rank{{os.environ[\'RANK\']}}.pt"))\n')
    proc = start(['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', wrapper, *args],
                 env={'OMP_NUM_THREADS': '1'})
    stdout, stderr = finish(proc, timeout=600)
    assert proc.returncode == 0, stdout + stderr
    import torch  # only the tests that train need it
    return (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
            [torch.load(tmp_path / f'rank{r}.pt') for r in range(nproc)])


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory):
    """(image_dir, caption_path) of a 12-picture, 24-caption COCO-format set."""
    return make_tiny_coco(str(tmp_path_factory.mktemp('tiny_coco')))


# a model small enough to train in seconds on a CPU, on the random-weight encoder
TINY_SIZES = ['--encoder_weights', 'none', '--crop_size', 32, '--embed_size', 16, '--hidden_size', 32]
# and, for the many tests that train for other reasons than loading: pictures of make_tiny_coco's size,
# loaded in the main process (a run's first batch waits for its workers to start)
TINY_MODEL = [*TINY_SIZES, '--image_size', 48, '--num_workers', 0]


@pytest.fixture(scope='session')
def tiny_vocab(tiny_coco, tmp_path_factory):
    """vocab.pkl of the tiny set, made by build_vocab.py (every word kept)."""
    path = str(tmp_path_factory.mktemp('vocab') / 'vocab.pkl')
    run('build_vocab.py', '--caption_path', tiny_coco[1], '--vocab_path', path, '--threshold', 1)
    return path


def train_args(tiny_coco, tiny_vocab, model_path, *extra):
    """train.py's command line on the tiny set (no val2014 there: it holds out a slice)."""
    image_dir, caption_path = tiny_coco
    return ['--image_dir', image_dir, '--caption_path', caption_path, '--vocab_path', tiny_vocab,
            '--model_path', model_path, '--val_caption_path', os.path.join(model_path, 'no_val.json'),
            '--val_fraction', 0.2, *TINY_MODEL, *extra]


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of tiny models: on a busy 2-core machine a second OpenMP
    thread only makes every small matmul wait for a descheduled worker. Restored afterwards."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# my_LSTM's CPU paths: the fused one on each matmul library fused_lstm can call, and the plain one
LSTM_PATHS = ['fused-mkl', 'fused-onednn', 'plain']


def use_cpu_matmul(lib, monkeypatch):
    """Make the fused path multiply on lib ('mkl' or 'onednn') for one test; skip where this
    torch build lacks it."""
    import fused_lstm
    if lib not in fused_lstm.cpu_matmuls():
        pytest.skip(f'{lib} is not available in this torch build')
    monkeypatch.setattr(fused_lstm, 'CPU_MATMUL', lib)


@pytest.fixture(params=LSTM_PATHS)
def lstm_path(request, monkeypatch):
    """'fused' or 'plain': the path of my_LSTM a test runs, the fused one once per CPU matmul
    library (fused_lstm.CPU_MATMUL, restored afterwards). 'auto' picks one library per CPU
    vendor (oneDNN on AMD, MKL elsewhere), so without this an Intel machine never runs what
    an AMD one does, and the other way round."""
    if request.param == 'plain':
        return 'plain'
    use_cpu_matmul(request.param.split('-')[1], monkeypatch)
    return 'fused'
