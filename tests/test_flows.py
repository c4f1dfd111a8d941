"""The flows users run, through the command lines, on the data layout the README describes.

    ROOT/data/train2014/, val2014/              the pictures (val2014 absent: a held-out slice)
    ROOT/data/resized2014/                      training pictures, as `python resize.py` leaves them
    ROOT/data/resizedval2014/                   validation pictures, as the README's resize.py line leaves them
    ROOT/data/annotations/captions_train2014.json, captions_val2014.json (absent with them)
    ROOT/data/vocab.pkl                         build_vocab.py's
    ROOT/models/                                train.py's, found there by sample.py and evaluate.py

Every run is `python train.py` from ROOT with its defaults (--augment crop_flip, --feature_cache
auto, --num_workers 2, ...), only TINY_SIZES and its flow's flags added, for 2 epochs, once with a val2014
split and once without. When a flag is added, its flow joins this list.
"""
import copy
import functools
import os
import re
import shutil

import pytest
import torch
from PIL import Image

import checkpoint
from checkpoint import load_captioner, load_checkpoint
from conftest import TINY_SIZES, make_tiny_coco, run
from data_loader import load_image
from vocab import load_vocab

FLOWS = {
    'defaults': [],
    'augment none': ['--augment', 'none'],
    'feature_cache on, 2 views': ['--feature_cache', 'on', '--cache_views', 2],
    'feature_cache off': ['--feature_cache', 'off'],
    'select_by bleu4': ['--select_by', 'bleu4'],
    'amp bf16': ['--amp', 'bf16'],
    'num_layers 2': ['--num_layers', 2],
    'recalibrate_bn 2': ['--recalibrate_bn', 2],
    # a 48 crop gives the ResNet a 2 x 2 map: 4 regions
    'decoder attention': ['--decoder', 'attention', '--crop_size', 48, '--grid_size', 2],
}
SHARED = {'defaults': 'default_run', 'decoder attention': 'attention_run'}  # flows whose models/ other tests read
TRAIN = [*TINY_SIZES, '--num_epochs', 2, '--batch_size', 4, '--learning_rate', 0.01]
VALIDATION_LINE = re.compile(r'^Validation after epoch \[(\d+)/(\d+)\]: Loss: \d+\.\d{4}, Perplexity: \d+\.\d{4}',
                             re.M)


@pytest.fixture(scope='module', autouse=True)
def flush_denormals():
    """The tests' own forward passes through the random ResNet, as fast as train.py's."""
    before = torch.is_grad_enabled()
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_grad_enabled(before)


@pytest.fixture(scope='module', params=['val2014', 'held-out slice'])
def data_root(request, tmp_path_factory):
    """ROOT/data as the README's steps leave it, with or without the val2014 split."""
    root = tmp_path_factory.mktemp('coco')
    data = root / 'data'
    make_tiny_coco(str(data), n_images=12, split='train2014')
    run('resize.py', cwd=root)  # its defaults: data/train2014 -> data/resized2014, 256 x 256, every core
    if request.param == 'val2014':
        make_tiny_coco(str(data), n_images=6, first=12, split='val2014')
        run('resize.py', '--image_dir', 'data/val2014', '--output_dir', 'data/resizedval2014', cwd=root)
    run('build_vocab.py', '--threshold', 1, cwd=root)  # its defaults: data/annotations -> data/vocab.pkl
    return root


def train_flow(data_root, root, flags):
    """Copy ROOT/data to `root` and run `python train.py` there; returns the process."""
    shutil.copytree(data_root / 'data', root / 'data')
    return run('train.py', *TRAIN, *flags, cwd=root)


@pytest.fixture(scope='module')
def default_run(data_root, tmp_path_factory):
    """ROOT after `python train.py` with the defaults (shared by the tests that read its models/)."""
    root = tmp_path_factory.mktemp('defaults')
    return root, train_flow(data_root, root, FLOWS['defaults'])


@pytest.fixture(scope='module')
def attention_run(data_root, tmp_path_factory):
    """ROOT after `python train.py --decoder attention ...` (shared as default_run is)."""
    root = tmp_path_factory.mktemp('attention')
    return root, train_flow(data_root, root, FLOWS['decoder attention'])


BUILD_ENCODER = checkpoint.build_encoder


@functools.lru_cache(maxsize=None)
def _encoder(embed_size, source, seed):
    return BUILD_ENCODER(embed_size, {'source': source, 'seed': seed})


@pytest.fixture
def shared_encoder(monkeypatch):
    """load_captioner as it is, but for rebuilding the same random ResNet-152 once per module
    instead of once per flow (a copy each time, so no flow's weights reach another)."""
    def build_once(embed_size, spec):
        if spec['source'] != 'none':
            return BUILD_ENCODER(embed_size, spec)
        return copy.deepcopy(_encoder(embed_size, spec['source'], spec['seed']))
    monkeypatch.setattr(checkpoint, 'build_encoder', build_once)


def check_run(proc, root, epochs):
    """Exit 0, one validation line per epoch, best.pt and latest.pt that load, a caption."""
    assert proc.returncode == 0
    lines = VALIDATION_LINE.findall(proc.stdout)
    assert [int(e) for e, _ in lines] == list(epochs), proc.stdout
    assert 'Traceback' not in proc.stderr
    models = root / 'models'
    latest, best = load_checkpoint(models / 'latest.pt'), load_checkpoint(models / 'best.pt')
    assert latest['epoch'] == epochs[-1] + 1 and latest['step'] == 0
    assert best['epoch'] <= latest['epoch'] and best['best'] == latest['best'], 'best.pt is the best'
    # best.pt is what sample.py and evaluate.py take by default (the test of that is below)
    captioner = load_captioner(checkpoint=str(models / 'best.pt'))
    picture = load_image(root / 'data' / 'resized2014' / 'img_000.png', captioner.image_size, captioner.crop_size)
    caption = captioner.vocab.decode(captioner.decoder.generate(captioner.encoder(picture))[0], markers=False)
    assert caption and all(w in captioner.vocab.word2idx for w in caption.split()), caption


@pytest.mark.parametrize('flow', FLOWS)
def test_train_flow(flow, data_root, tmp_path, shared_encoder, request):
    if flow in SHARED:
        root, proc = request.getfixturevalue(SHARED[flow])
    else:
        root, proc = tmp_path, train_flow(data_root, tmp_path, FLOWS[flow])
    check_run(proc, root, epochs=range(2))


def test_resume_to_a_third_epoch(default_run, tmp_path, shared_encoder):
    root, _ = default_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    proc = run('train.py', *TRAIN, '--num_epochs', 3, '--resume', 'models/latest.pt', cwd=tmp_path)
    assert 'resumed from models/latest.pt: epoch 2, step 0' in proc.stdout
    check_run(proc, tmp_path, epochs=[2])


def test_sample_and_evaluate_find_the_model(default_run, data_root):
    """No model flags: both take models/best.pt, and say so."""
    root, _ = default_run
    best = load_checkpoint(root / 'models' / 'best.pt')
    chosen = checkpoint.describe(os.path.join('models/', 'best.pt'), best)  # e.g. 'models/best.pt (after epoch [1/2], ...'
    assert chosen.startswith('models/best.pt (after epoch [') and 'validation loss' in chosen
    proc = run('sample.py', '--image', 'data/resized2014/img_000.png', cwd=root)
    assert f'model: {chosen}' in proc.stderr
    words, vocab = proc.stdout.strip().splitlines()[-1].split(), load_vocab(root / 'data' / 'vocab.pkl')
    assert 0 < len(words) <= 20 and all(w in vocab.word2idx for w in words), words
    # --gates: the same caption printed, and its gates drawn
    proc = run('sample.py', '--image', 'data/resized2014/img_000.png', '--gates', 'gates/img_000.png', cwd=root)
    assert proc.stdout.strip().splitlines()[0].split() == words
    with Image.open(root / 'gates' / 'img_000.png') as plot:
        assert plot.format == 'PNG' and plot.width > 400
    # evaluate.py's default is val2014; without it, the training pictures stand in
    data = [] if os.path.isdir(root / 'data' / 'resizedval2014') else [
        '--image_dir', 'data/resized2014', '--caption_path', 'data/annotations/captions_train2014.json']
    proc = run('evaluate.py', *data, cwd=root)
    assert re.search(r'^BLEU-4 +\d+\.\d\d$', proc.stdout, re.M), proc.stdout
    assert f'model: {chosen}' in proc.stdout
    assert os.path.isfile(root / 'models' / ('captions_val2014_results.json' if not data
                                             else 'captions_train2014_results.json'))


def test_attention_resumes_samples_with_its_figure_and_evaluates(attention_run, tmp_path, shared_encoder):
    """--decoder attention end to end: resumed to a third epoch (the checkpoint says which decoder
    and grid it holds: no flag repeats them; the crop, which the data sets take, is given again), then sample.py --attention --gates and evaluate.py
    with no model flags."""
    root, _ = attention_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    proc = run('train.py', *TRAIN, '--crop_size', 48, '--num_epochs', 3, '--resume', 'models/latest.pt', cwd=tmp_path)
    assert 'resumed from models/latest.pt: epoch 2, step 0' in proc.stdout
    check_run(proc, tmp_path, epochs=[2])
    latest = load_checkpoint(tmp_path / 'models' / 'latest.pt')
    assert (latest['args']['decoder'], latest['args']['grid_size']) == ('attention', 2)
    assert isinstance(load_captioner(checkpoint=str(tmp_path / 'models' / 'best.pt')).decoder,
                      checkpoint.AttentionDecoder)
    proc = run('sample.py', '--image', 'data/resized2014/img_000.png', cwd=tmp_path)
    words = proc.stdout.strip().splitlines()[-1].split()
    proc = run('sample.py', '--image', 'data/resized2014/img_000.png', '--attention', 'figs/attention.png',
               '--gates', 'figs/gates.png', cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[0].split() == words
    for name in ('attention.png', 'gates.png'):
        with Image.open(tmp_path / 'figs' / name) as plot:
            assert plot.format == 'PNG' and plot.width > 400, name
    data = [] if os.path.isdir(tmp_path / 'data' / 'resizedval2014') else [
        '--image_dir', 'data/resized2014', '--caption_path', 'data/annotations/captions_train2014.json']
    proc = run('evaluate.py', *data, '--num_workers', 0, cwd=tmp_path)
    assert re.search(r'^BLEU-4 +\d+\.\d\d$', proc.stdout, re.M), proc.stdout


def test_attention_figure_needs_an_attention_model(default_run):
    root, _ = default_run
    proc = run('sample.py', '--image', 'data/resized2014/img_000.png', '--attention', 'a.png', cwd=root, check=False)
    assert proc.returncode == 2 and '--decoder attention' in proc.stderr and 'Traceback' not in proc.stderr
    assert not os.path.exists(root / 'a.png')
