"""Shared fixtures: a tiny COCO-format caption set the tests make themselves.

    tiny_coco/
        train2014/img_000.png ...        small pictures: one coloured square on a coloured background
        annotations/captions_train2014.json   COCO layout: images, annotations (2 captions each)
"""
import json
import os
import random
import subprocess
import sys

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


def run(script, *args, cwd=REPO, check=True, timeout=600):
    """Run one of the repository's scripts through its command line, as a user would."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}')
    return proc


def torchrun_train(tmp_path, args, nproc=2):
    """`torchrun --nproc_per_node=nproc train.py ARGS` on the CPU (gloo), one thread a process.
    Returns (process, [each rank's named_parameters() at the end, as tensors])."""
    wrapper = tmp_path / 'ddp_main.py'
    wrapper.write_text(
        'import os, sys, torch\n'
        f'sys.path.insert(0, {REPO!r})\n'
        'import train\n'
        'model = train.main(sys.argv[1:])\n'
        f'torch.save(dict(model.named_parameters()), os.path.join({str(tmp_path)!r}, f"rank{{os.environ[\'RANK\']}}.pt"))\n')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                           str(wrapper), *map(str, args)], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import torch  # only the tests that train need it
    return proc, [torch.load(tmp_path / f'rank{r}.pt') for r in range(nproc)]


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory):
    """(image_dir, caption_path) of a 12-picture, 24-caption COCO-format set."""
    return make_tiny_coco(str(tmp_path_factory.mktemp('tiny_coco')))


# a model small enough to train in seconds on a CPU, on the random-weight encoder
TINY_MODEL = ['--encoder_weights', 'none', '--crop_size', 32, '--image_size', 48, '--embed_size', 16,
              '--hidden_size', 32, '--num_workers', 0]


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
