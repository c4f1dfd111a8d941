"""feature_cache.py: cached features equal the ResNet's, are reused, and are never used stale.

A 6-picture COCO-format set of 40 x 40 images, crop 32. The first test runs a randomly
initialised EncoderCNN's ResNet-152 (six 32 x 32 crops: well under a second on an idle CPU,
after a few seconds of one-off warm-up per batch shape). The others build two dozen caches of
several shapes; they use `small_encoder`, an EncoderCNN whose ResNet is a two-layer stand-in:
what they test (keys, files, views, captions) does not depend on the network.
"""
import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import feature_cache
from conftest import REPO, TINY_MODEL, make_tiny_coco, run
from data_loader import CocoDataset, collate_fn, image_transform, open_rgb
from feature_cache import FeatureCache, FeatureDataset, native_bf16, random_view, view_seed
from model import EncoderCNN
from utils import file_sha256
from vocab import SPECIAL_TOKENS, Vocabulary, tokenize

CROP = 32


@pytest.fixture(scope='module')
def coco_set(tmp_path_factory):
    """(image_dir, caption_path): 6 images of 40 x 40, as resize.py would leave them, 2 captions each."""
    return make_tiny_coco(str(tmp_path_factory.mktemp('fc_coco')), n_images=6, size=40)


@pytest.fixture
def own_set(coco_set, tmp_path):
    """A private copy of the set, for tests that modify images."""
    root = os.path.dirname(coco_set[0])
    shutil.copytree(root, tmp_path / 'coco')
    return str(tmp_path / 'coco' / 'train2014'), str(tmp_path / 'coco' / 'annotations' / 'captions_train2014.json')


@pytest.fixture(scope='module')
def encoder():
    torch.manual_seed(0)
    return EncoderCNN(8, weights=None).eval()


@pytest.fixture(scope='module')
def vocab(coco_set):
    """Every word of the captions but 'green', so that <unk> shows up too."""
    with open(coco_set[1]) as f:
        captions = [ann['caption'] for ann in json.load(f)['annotations']]
    vocab = Vocabulary()
    for word in list(SPECIAL_TOKENS) + sorted({w for c in captions for w in tokenize(c)} - {'green'}):
        vocab.add_word(word)
    return vocab


@pytest.fixture(scope='module')
def small_encoder():
    """An EncoderCNN with a cheap stand-in for the ResNet: (N, 3, H, W) -> (N, 2048, 1, 1)."""
    torch.manual_seed(0)
    encoder = EncoderCNN(8, weights=None)
    encoder.resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 5, stride=4), torch.nn.ReLU(),
                                         torch.nn.AdaptiveAvgPool2d(1)).requires_grad_(False)
    return encoder.eval()


@pytest.fixture
def calls(small_encoder):
    """How many images small_encoder's ResNet (or a deepcopy's) has seen since the test began."""
    seen = [0]

    def count(module, inputs):
        seen[0] += len(inputs[0])
    handle = small_encoder.resnet.register_forward_pre_hook(count)
    yield seen
    handle.remove()


def make_cache(image_dir, caption_path, cache_dir, **kw):
    kw = {'crop_size': CROP, 'views': 1, 'encoder_id': 'random:seed=0', 'seed': 0, **kw}
    return FeatureCache(image_dir, caption_path, cache_dir=str(cache_dir), **kw)


def build(cache, encoder):
    return cache.load_or_build(encoder, 'cpu', batch_size=64, num_workers=0)


def reference_features(cache, encoder):
    """What the ResNet gives for the centre crops, the way CocoDataset's eval transform makes them."""
    transform = image_transform(CROP, train=False)
    images = torch.stack([transform(open_rgb(p)) for p in cache.paths()])  # (N, 3, crop, crop)
    return encoder.extract(images).numpy()                                   # (N, 2048)


def close(a, b):
    """Equal up to float32 rounding (a random ResNet's features reach 1e5)."""
    return np.allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


# (1) exactness -----------------------------------------------------------------------------

def test_view0_is_the_centre_crop_feature(coco_set, encoder, tmp_path):
    cache = make_cache(*coco_set, tmp_path)
    features = build(cache, encoder)
    assert isinstance(features, np.memmap) and not features.flags.writeable
    assert features.shape == (1, 6, 2048) and features.dtype == np.float32
    assert cache.image_ids == sorted(cache.image_ids)
    assert close(features[0], reference_features(cache, encoder))


# (2) reuse --------------------------------------------------------------------------------

def test_second_load_does_not_run_the_cnn(coco_set, small_encoder, tmp_path, calls, monkeypatch, capsys):
    first = np.array(build(make_cache(*coco_set, tmp_path), small_encoder))
    assert calls[0] == 6

    def no_cnn(images):
        raise AssertionError('the ResNet ran although the cache was valid')
    monkeypatch.setattr(small_encoder, 'extract', no_cnn)
    cache = make_cache(*coco_set, tmp_path)  # a later run: a new object, the same files
    assert np.array_equal(build(cache, small_encoder), first)
    assert 'will not run' in capsys.readouterr().out
    assert np.array_equal(cache.load(small_encoder), first)


def old_weights_digest(encoder):
    """feature_cache.weights_digest as it was before the cache keyed on EncoderCNN.fingerprint()
    (verbatim): the caches already on disk carry this digest in their keys."""
    h = hashlib.sha256()
    for name, tensor in encoder.resnet.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        h.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype}'.encode())
        h.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # raw bytes: bf16 too
    return h.hexdigest()


def old_file_digest(path):
    """feature_cache._file_digest as it was (verbatim), which keyed the encoded captions."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def test_keys_of_existing_caches_stay_valid(coco_set, encoder, small_encoder, tmp_path):
    for net in (encoder, small_encoder):
        assert net.fingerprint() == old_weights_digest(net)
    cache = make_cache(*coco_set, tmp_path)
    ingredients = cache.ingredients(encoder)
    assert ingredients['weights'] == old_weights_digest(encoder)
    # the key is the same digest of the same ingredients
    cache.load(encoder)
    assert cache.key == feature_cache._digest({**ingredients, 'weights': old_weights_digest(encoder)})
    assert file_sha256(coco_set[1]) == old_file_digest(coco_set[1])
    # a channels-last ResNet (train.py's on CUDA) has the same fingerprint
    other = copy.deepcopy(small_encoder)
    other.resnet.to(memory_format=torch.channels_last)
    assert other.fingerprint() == small_encoder.fingerprint()


# (3) what the key depends on ---------------------------------------------------------------

def test_changed_image_or_setting_builds_a_new_cache(own_set, small_encoder, tmp_path, calls, capsys):
    cache = make_cache(*own_set, tmp_path)
    build(cache, small_encoder)
    keys = {cache.key}
    assert calls[0] == 6

    def rebuilt(cache, encoder=small_encoder):
        before = calls[0]
        build(cache, encoder)
        assert cache.key not in keys, 'a changed input kept the old key'
        keys.add(cache.key)
        return calls[0] > before

    image = cache.paths()[2]
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # touched
    assert rebuilt(cache)
    with open(image, 'ab') as f:                                         # modified
        f.write(b'\0')
    assert rebuilt(cache)
    assert rebuilt(make_cache(*own_set, tmp_path, crop_size=24))
    assert rebuilt(make_cache(*own_set, tmp_path, views=2))
    assert rebuilt(make_cache(*own_set, tmp_path, encoder_id='imagenet:IMAGENET1K_V1'))
    assert rebuilt(make_cache(*own_set, tmp_path, amp_dtype=torch.bfloat16))
    other = copy.deepcopy(small_encoder)  # the same encoder_id, other weights: caught by their digest
    weight = other.resnet[0].weight
    original = weight[0, 0, 0, 0].item()
    with torch.no_grad():
        weight[0, 0, 0, 0] += 1
    assert rebuilt(make_cache(*own_set, tmp_path), other)
    # the message says what changed since the last cache of these captions
    assert re.search(r'changed since features-\w+\.json: [\w, ]*crop_size', capsys.readouterr().out)
    # the projection is not part of the key: it learns, the cache only holds the ResNet's output
    with torch.no_grad():
        weight[0, 0, 0, 0] = original
        other.linear.weight.zero_()
    cache = make_cache(*own_set, tmp_path)
    build(cache, other)
    assert cache.key in keys
    # views == 1 does not depend on the seed, views > 1 does
    assert make_cache(*own_set, tmp_path, seed=5).load(small_encoder) is not None
    assert make_cache(*own_set, tmp_path, views=2, seed=5).load(small_encoder) is None


def test_missing_image_and_bad_arguments(own_set, small_encoder, tmp_path):
    with pytest.raises(ValueError, match='views'):
        make_cache(*own_set, tmp_path, views=0)
    cache = make_cache(*own_set, tmp_path)
    os.remove(cache.paths()[1])  # after the cache listed its pictures
    with pytest.raises(FileNotFoundError, match='resize.py'):
        build(cache, small_encoder)


def test_a_few_missing_pictures_are_left_out_most_refused(own_set, small_encoder, vocab, tmp_path, capsys):
    image_dir, caption_path = own_set
    paths = make_cache(*own_set, tmp_path).paths()
    os.remove(paths[1])  # resize.py skipped a corrupt picture
    cache = make_cache(*own_set, tmp_path)
    features = build(cache, small_encoder)
    assert features.shape == (1, 5, 2048) and len(cache.image_ids) == 5
    assert re.search(r'note: 1 of 6 pictures .* are not in ', capsys.readouterr().err)
    assert close(features[0], reference_features(cache, small_encoder))
    # its captions are left out, item for item as CocoDataset leaves them out
    cached = FeatureDataset(cache, vocab, train=False)
    images = CocoDataset(image_dir, caption_path, vocab, image_transform(CROP, train=False))
    assert len(cached) == len(images) == 10 and cached.item_image_ids() == images.item_image_ids()
    for i in range(len(images)):
        assert torch.equal(cached[i][1], images[i][1])
        assert close(cached[i][0].numpy(), small_encoder.extract(images[i][0][None])[0].numpy())
    for path in paths[2:5]:  # 4 of 6 missing: not the resized folder
        os.remove(path)
    with pytest.raises(FileNotFoundError, match='resize.py'):
        build(make_cache(*own_set, tmp_path), small_encoder)


def test_training_on_cached_features_with_a_missing_picture(tmp_path):
    image_dir, caption_path = make_tiny_coco(str(tmp_path / 'coco'), n_images=8, size=48)
    vocab_path = tmp_path / 'vocab.pkl'
    run('build_vocab.py', '--caption_path', caption_path, '--vocab_path', vocab_path, '--threshold', 1)
    os.remove(os.path.join(image_dir, sorted(os.listdir(image_dir))[3]))
    out = run('train.py', '--image_dir', image_dir, '--caption_path', caption_path, '--vocab_path', vocab_path,
              '--model_path', tmp_path / 'models', '--val_caption_path', tmp_path / 'no_val.json',
              '--val_fraction', 0.25, *TINY_MODEL, '--augment', 'none', '--feature_cache', 'on',
              '--num_epochs', 1, '--batch_size', 4)
    assert 'note: 1 of 8 pictures' in out.stderr and 'Traceback' not in out.stderr
    assert re.search(r'building features-\w+\.npy \(7 images x 1 views', out.stdout), out.stdout
    assert os.path.isfile(tmp_path / 'models' / 'best.pt')


# (4) partial and broken caches -------------------------------------------------------------

def test_interrupted_build_is_rebuilt_not_used(coco_set, small_encoder, tmp_path, calls, monkeypatch, capsys):
    cache = make_cache(*coco_set, tmp_path)
    extract = small_encoder.extract

    def interrupted(images):  # Ctrl-C in the middle of the build
        extract(images)
        raise KeyboardInterrupt
    monkeypatch.setattr(small_encoder, 'extract', interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(cache, small_encoder)
    assert os.listdir(tmp_path) == [], 'an interrupted build left files behind'
    monkeypatch.setattr(small_encoder, 'extract', extract)

    # a SIGKILL'd build leaves its .partial: half-written, never used, deleted and rebuilt
    assert cache.load(small_encoder) is None
    with open(cache.path + '.partial', 'wb') as f:
        f.write(b'\x93NUMPY half a file')
    assert make_cache(*coco_set, tmp_path).load(small_encoder) is None
    features = build(cache, small_encoder)
    assert 'left by an interrupted build' in capsys.readouterr().out
    assert not os.path.exists(cache.path + '.partial')
    assert calls[0] == 6 + 6
    assert close(features[0], reference_features(cache, small_encoder))


def break_incomplete(cache):
    with open(cache.meta_path) as f:
        meta = json.load(f)
    meta['complete'] = False
    with open(cache.meta_path, 'w') as f:
        json.dump(meta, f)


def break_truncated(cache):
    size = os.path.getsize(cache.path)
    with open(cache.path, 'r+b') as f:
        f.truncate(size - 4096)


def break_no_meta(cache):  # killed between renaming the .npy and writing the meta
    os.remove(cache.meta_path)


def break_shape(cache):  # an .npy of another shape under the right name
    np.save(cache.path, np.zeros((1, 5, 2048), np.float32))


def break_other_key(cache):
    with open(cache.meta_path) as f:
        meta = json.load(f)
    meta['key'] = '0' * 64
    with open(cache.meta_path, 'w') as f:
        json.dump(meta, f)


@pytest.mark.parametrize('damage', [break_incomplete, break_truncated, break_no_meta, break_shape, break_other_key])
def test_damaged_cache_is_detected_and_rebuilt(coco_set, small_encoder, tmp_path, calls, damage):
    cache = make_cache(*coco_set, tmp_path)
    good = np.array(build(cache, small_encoder))
    damage(cache)
    assert make_cache(*coco_set, tmp_path).load(small_encoder) is None, 'a damaged cache passed the check'
    before = calls[0]
    assert np.array_equal(build(make_cache(*coco_set, tmp_path), small_encoder), good)
    assert calls[0] == before + 6, 'the damaged cache was used instead of rebuilt'


# (5) determinism and views -----------------------------------------------------------------

def test_rebuild_gives_identical_bytes_and_random_views(coco_set, small_encoder, tmp_path):
    cache = make_cache(*coco_set, tmp_path, views=3, seed=7)
    features = np.array(build(cache, small_encoder))  # (3, 6, 2048)
    with open(cache.path, 'rb') as f:
        first = f.read()
    cache.build(small_encoder, 'cpu', batch_size=64)
    with open(cache.path, 'rb') as f:
        assert f.read() == first
    assert close(features[0], reference_features(cache, small_encoder))
    # views 1, 2 are seeded random crops + flips, not the centre crop and not each other
    for view in (1, 2):
        assert not close(features[view], features[0])
        crops = torch.stack([random_view(open_rgb(p), CROP, torch.Generator().manual_seed(view_seed(7, view, row)))
                             for row, p in enumerate(cache.paths())])
        assert close(features[view], small_encoder.extract(crops).numpy())
    assert not close(features[1], features[2])
    # another seed, other crops
    other = np.array(build(make_cache(*coco_set, tmp_path, views=3, seed=8), small_encoder))
    assert np.array_equal(other[0], features[0]) and not close(other[1], features[1])


def test_feature_dataset_picks_views_deterministically(coco_set, small_encoder, vocab, tmp_path):
    cache = make_cache(*coco_set, tmp_path, views=4)
    features = build(cache, small_encoder)
    train = FeatureDataset(cache, vocab, seed=3)
    n = len(train)
    views = [train.view(i) for i in range(n)]
    assert views == [FeatureDataset(cache, vocab, seed=3).view(i) for i in range(n)]
    assert set(views) == {1, 2, 3}  # augmented: view 0 stays the evaluation view
    train.set_epoch(1)
    epoch1 = [train.view(i) for i in range(n)]
    assert epoch1 != views and set(epoch1) <= {1, 2, 3}
    assert [FeatureDataset(cache, vocab, seed=4).view(i) for i in range(n)] != views
    for i in range(n):
        assert np.array_equal(train[i][0].numpy(), features[epoch1[i], train.rows[i]])
    val = FeatureDataset(cache, vocab, seed=3, train=False)
    assert {val.view(i) for i in range(n)} == {0}

    single = make_cache(*coco_set, tmp_path, views=1)
    build(single, small_encoder)
    assert {FeatureDataset(single, vocab).view(i) for i in range(n)} == {0}


# (6) FeatureDataset is CocoDataset with features -------------------------------------------

def test_feature_dataset_matches_coco_dataset(coco_set, small_encoder, vocab, tmp_path, monkeypatch):
    cache = make_cache(*coco_set, tmp_path)
    build(cache, small_encoder)
    features = FeatureDataset(cache, vocab, train=False)
    images = CocoDataset(*coco_set, vocab, image_transform(CROP, train=False))
    assert len(features) == len(images) == 12
    assert features.item_image_ids() == images.item_image_ids()
    assert any(3 in images[i][1].tolist() for i in range(len(images))), 'the fixture should have an <unk>'
    for i in range(len(images)):
        image, caption = images[i]
        feature, cached_caption = features[i]
        assert feature.dtype == torch.float32 and feature.shape == (2048,)
        assert cached_caption.dtype == torch.long and torch.equal(cached_caption, caption)
        assert close(feature.numpy(), small_encoder.extract(image[None])[0].numpy())

    # batches are DecoderRNN's: (N, 2048) features, padded captions, lengths sorted
    inputs, targets, lengths = collate_fn([features[i] for i in range(5)])
    assert inputs.shape == (5, 2048) and targets.shape == (5, max(lengths)) and lengths == sorted(lengths)[::-1]

    # the encoded captions are saved beside the features: a second dataset does not tokenize
    def no_tokenizing(*args):
        raise AssertionError('captions were encoded again')
    monkeypatch.setattr(feature_cache, 'encode_caption', no_tokenizing)
    again = FeatureDataset(cache, vocab, train=False)
    assert all(torch.equal(again[i][1], features[i][1]) for i in range(len(again)))


def test_feature_dataset_pickles_without_the_features(coco_set, small_encoder, vocab, tmp_path):
    cache = make_cache(*coco_set, tmp_path, views=2)
    build(cache, small_encoder)
    dataset = FeatureDataset(cache, vocab, seed=1)
    dataset.set_epoch(2)
    blob = pickle.dumps(dataset)  # what a spawn/forkserver DataLoader worker receives
    assert len(blob) < cache.features.nbytes, 'the memory map was pickled as a copy'
    clone = pickle.loads(blob)
    for i in range(len(dataset)):
        assert torch.equal(clone[i][0], dataset[i][0]) and torch.equal(clone[i][1], dataset[i][1])


def test_dataset_needs_a_loaded_cache(coco_set, vocab, tmp_path):
    with pytest.raises(RuntimeError, match='load_or_build'):
        FeatureDataset(make_cache(*coco_set, tmp_path), vocab)


# (7) signals while the cache is filled ---------------------------------------------------

BUILD_SLOWLY = '''
import signal, sys, time, torch
sys.path.insert(0, {repo!r})
from feature_cache import FeatureCache
from model import EncoderCNN
if {handler!r} == 'raise':  # train.py's: SIGTERM becomes a KeyboardInterrupt
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
class Encoder(torch.nn.Module):  # EncoderCNN's interface around a cheap, slow stand-in for the ResNet
    fingerprint, extract = EncoderCNN.fingerprint, EncoderCNN.extract
    grid_size = 0  # the pooled vector
    def __init__(self):
        super().__init__()
        self.resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1))
        self.linear = torch.nn.Linear(2048, 8)
encoder = Encoder().eval()
encoder.resnet.register_forward_pre_hook(lambda module, inputs: time.sleep(0.3))  # 6 batches: ~2 s
cache = FeatureCache({root!r}, {json!r}, 32, cache_dir={cache_dir!r})
try:
    cache.load_or_build(encoder, 'cpu', batch_size=1)
except KeyboardInterrupt:
    sys.exit(130)
'''


@pytest.mark.parametrize('signum, handler, returncode', [
    (signal.SIGINT, 'none', 130),                        # Ctrl-C
    (signal.SIGTERM, 'raise', 130),                      # under train.py's handler
    (signal.SIGTERM, 'none', -signal.SIGTERM),           # no handler: it still dies of SIGTERM
])
def test_signal_during_build_removes_the_partial(coco_set, tmp_path, signum, handler, returncode):
    cache_dir = tmp_path / 'features'
    script = BUILD_SLOWLY.format(repo=REPO, handler=handler, root=coco_set[0], json=coco_set[1],
                                 cache_dir=str(cache_dir))
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (cache_dir.is_dir() and any(n.endswith('.partial') for n in os.listdir(cache_dir))):
        assert proc.poll() is None and time.time() < deadline, 'the build never started'
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == returncode, err
    assert 'Traceback' not in err
    assert [n for n in os.listdir(cache_dir) if not n.startswith('.')] == [], 'the build left files behind'


# (8) the frozen forward's layout and precision -------------------------------------------

def test_bf16_detection(monkeypatch):
    for flags, native in [({'avx512f', 'amx_bf16', 'amx_tile'}, True), ({'avx512f', 'avx512_bf16'}, True),
                          ({'avx2', 'avx512f'}, False), (set(), False)]:
        monkeypatch.setattr(feature_cache, 'cpu_flags', lambda flags=flags: flags)
        assert native_bf16('cpu') is native, flags
    monkeypatch.setattr(feature_cache, 'cpu_flags', lambda: {'amx_bf16'})
    monkeypatch.setattr(torch.backends.mkldnn, 'is_available', lambda: False)
    assert native_bf16('cpu') is False, 'bf16 convolutions on the CPU come from oneDNN'
    assert native_bf16('meta') is False


@pytest.mark.parametrize('amp_dtype', [None, torch.bfloat16])
def test_layout_of_the_frozen_forward(coco_set, small_encoder, tmp_path, amp_dtype):
    """float32 on the CPU: train.py's NCHW; under autocast: channels-last. Either way the
    encoder is handed back in the layout it came in."""
    seen = []
    conv = small_encoder.resnet[0]
    handle = conv.register_forward_pre_hook(lambda module, inputs: seen.append(
        (inputs[0].is_contiguous(memory_format=torch.channels_last) and inputs[0].shape[1] > 1,
         module.weight.is_contiguous(memory_format=torch.channels_last))))
    try:
        build(make_cache(*coco_set, tmp_path, amp_dtype=amp_dtype), small_encoder)
    finally:
        handle.remove()
    assert set(seen) == {(amp_dtype is not None,) * 2}
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not native_bf16('cpu'), reason='this CPU has no native bf16 (AMX or AVX512-BF16)')
def test_bf16_features_are_close_and_keyed_apart(coco_set, encoder, tmp_path):
    fp32 = make_cache(*coco_set, tmp_path)
    bf16 = make_cache(*coco_set, tmp_path, amp_dtype=torch.bfloat16)
    a, b = np.array(build(fp32, encoder)), np.array(build(bf16, encoder))
    assert fp32.key != bf16.key and fp32.path != bf16.path
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 3e-2, 'bf16 features far from float32 ones'
    assert not np.array_equal(a, b), 'the bf16 build ran in float32'
