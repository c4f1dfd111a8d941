"""checkpoint.py: the tutorial's published files, safe loading, and encoder weights."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

import checkpoint
from checkpoint import EncoderWeightsError, build_encoder, encoder_spec, load_captioner, load_checkpoint
from conftest import REPO, TUTORIAL_VOCABULARY, run
from data_loader import load_image
from model import DecoderRNN, EncoderCNN

# the tutorial's build_vocab.py, as it pickled its vocabulary: a class that lives in __main__
TUTORIAL_BUILD_VOCAB = 'import pickle, sys\n' + TUTORIAL_VOCABULARY + textwrap.dedent('''
    vocab = Vocabulary()
    for word in ['<pad>', '<start>', '<end>', '<unk>'] + ['w%d' % i for i in range(26)]:
        vocab.add_word(word)
    with open(sys.argv[1], 'wb') as f:
        pickle.dump(vocab, f)
''')


@pytest.fixture(scope='module')
def tutorial_files(tmp_path_factory):
    """encoder-5-3000.pkl (a whole EncoderCNN state dict), decoder-5-3000.pkl (nn.LSTM keys), vocab.pkl."""
    root = tmp_path_factory.mktemp('tutorial')
    subprocess.run([sys.executable, '-c', TUTORIAL_BUILD_VOCAB, str(root / 'vocab.pkl')], check=True, cwd=root)
    torch.manual_seed(1)
    encoder = EncoderCNN(12).eval()
    decoder = DecoderRNN(12, 20, vocab_size=30, num_layers=1)
    decoder.lstm = nn.LSTM(12, 20, 1, batch_first=True)  # the tutorial's decoder
    torch.save(encoder.state_dict(), root / 'encoder-5-3000.pkl')
    torch.save(decoder.state_dict(), root / 'decoder-5-3000.pkl')
    return root, encoder, decoder.eval()


def test_tutorial_files_caption_like_the_tutorial(tutorial_files, tiny_coco):
    root, encoder, decoder = tutorial_files
    image = os.path.join(tiny_coco[0], 'img_000.png')
    # the tutorial's sample.py: resize to 224 x 224, nn.LSTM decoder, words up to <end>
    ids = decoder.sample(encoder(load_image(image, 224, 224)))[0].tolist()
    words = [f'w{i - 4}' if i > 3 else ['<pad>', '<start>', '<end>', '<unk>'][i] for i in ids]
    expected = ' '.join(words[:words.index('<end>') + 1] if '<end>' in words else words)
    out = run('sample.py', '--image', image, '--encoder_path', root / 'encoder-5-3000.pkl',
              '--decoder_path', root / 'decoder-5-3000.pkl', '--vocab_path', root / 'vocab.pkl', cwd=root).stdout
    assert out.strip() == expected


def test_tutorial_vocab_size_mismatch_is_one_clear_line(tutorial_files, tiny_coco, tiny_vocab):
    root, _, _ = tutorial_files
    proc = run('sample.py', '--image', os.path.join(tiny_coco[0], 'img_000.png'),
               '--encoder_path', root / 'encoder-5-3000.pkl', '--decoder_path', root / 'decoder-5-3000.pkl',
               '--vocab_path', tiny_vocab, check=False)
    assert proc.returncode == 2
    assert 'was trained with 30' in proc.stderr and 'Traceback' not in proc.stderr


def test_checkpoints_load_without_running_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    torch.save({'decoder': Payload()}, tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match='not a loadable checkpoint'):
        load_checkpoint(tmp_path / 'evil.pt')
    assert not os.path.exists(tmp_path / 'pwned')
    with pytest.raises(FileNotFoundError, match='train.py'):
        load_checkpoint(tmp_path / 'missing.pt')


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'latest.pt'
    checkpoint.save_checkpoint({'step': 1}, path)
    def crash(obj, f):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({'step': 2}, path)
    assert load_checkpoint(path) == {'step': 1}, 'the previous checkpoint survives a failed save'
    assert os.listdir(tmp_path) == ['latest.pt'], 'no temporary file is left behind'


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    def offline(*args, **kwargs):
        raise OSError('no network')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(EncoderWeightsError) as e:
        build_encoder(8, encoder_spec('imagenet'))
    message = str(e.value)
    for part in ('resnet152-394f9c45.pth', 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
                 str(tmp_path / 'checkpoints'), '--encoder_weights none'):
        assert part in message


def test_train_without_imagenet_weights_stops_with_one_line(tiny_coco, tiny_vocab, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / 'torch'), https_proxy='http://127.0.0.1:9',
               HTTPS_PROXY='http://127.0.0.1:9')  # an unused loopback port: the download fails at once
    proc = subprocess.run([sys.executable, 'train.py', '--image_dir', tiny_coco[0], '--caption_path', tiny_coco[1],
                           '--vocab_path', tiny_vocab, '--model_path', str(tmp_path / 'models')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'resnet152-394f9c45.pth' in proc.stderr and '--encoder_weights none' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not os.path.exists(tmp_path / 'models' / 'latest.pt')


def test_encoder_weights_none_and_file_rebuild_exactly(tmp_path):
    a, b = build_encoder(8, encoder_spec('none', seed=3)), build_encoder(8, encoder_spec('none', seed=3))
    c = build_encoder(8, encoder_spec('none', seed=4))
    first = next(a.resnet.parameters())
    assert torch.equal(first, next(b.resnet.parameters()))
    assert not torch.equal(first, next(c.resnet.parameters()))
    # a torchvision ResNet-152 state dict (what --encoder_weights PATH takes)
    torch.manual_seed(5)
    resnet = torchvision.models.resnet152()
    torch.save(resnet.state_dict(), tmp_path / 'resnet.pth')
    encoder = build_encoder(8, encoder_spec(str(tmp_path / 'resnet.pth')))
    assert torch.equal(encoder.resnet[0].weight, resnet.conv1.weight)
    assert torch.equal(encoder.resnet[7][2].bn3.running_var, resnet.layer4[2].bn3.running_var)
    with pytest.raises(EncoderWeightsError, match="neither 'imagenet', 'none' nor an existing file"):
        encoder_spec(str(tmp_path / 'nope.pth'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_gpu_checkpoint_loads_on_cpu(tiny_coco, tiny_vocab, tmp_path):
    from conftest import train_args
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--dry_run', '--device', 'cuda'))
    captioner = load_captioner(model_path=str(tmp_path), device='cpu')
    assert next(captioner.decoder.parameters()).device.type == 'cpu'


def _tiny_checkpoint(path, epoch, loss, **extra):
    """A checkpoint of train.py's layout (the model's weights are not read by describe)."""
    ckpt = {'encoder': {}, 'decoder': {}, 'vocab': ['<pad>'], 'encoder_weights': {'source': 'none', 'seed': 0},
            'args': {'num_epochs': 3, 'select_by': 'loss'}, 'epoch': epoch, 'step': 0,
            'history': [{'split': 'val', 'epoch': epoch - 1, 'loss': loss, 'global_step': 5 * epoch}], **extra}
    checkpoint.save_checkpoint(ckpt, path)
    return ckpt


def test_default_model_is_best_then_latest(tmp_path):
    assert checkpoint.default_checkpoint(str(tmp_path)) is None
    _tiny_checkpoint(tmp_path / 'latest.pt', 2, 3.5)
    assert checkpoint.default_checkpoint(str(tmp_path)) == str(tmp_path / 'latest.pt')
    _tiny_checkpoint(tmp_path / 'best.pt', 1, 3.25)
    os.utime(tmp_path / 'best.pt', (1, 1))  # older than latest.pt: still the one taken
    assert checkpoint.default_checkpoint(str(tmp_path)) == str(tmp_path / 'best.pt')
    ckpt = load_checkpoint(tmp_path / 'best.pt')
    assert checkpoint.describe('models/best.pt', ckpt) == 'models/best.pt (after epoch [0/3], validation loss 3.2500)'
    ckpt['step'], ckpt['args']['select_by'], ckpt['best'] = 4, 'bleu4', {'score': 12.345, 'global_step': 5}
    assert checkpoint.describe('models/latest.pt', ckpt) == \
        'models/latest.pt (epoch [1/3] at step 4; after epoch [0/3], validation loss 3.2500, bleu4 12.35)'


@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 half a zip', b'not a checkpoint at all'])
def test_broken_checkpoint_is_a_value_error_naming_it(tmp_path, content):
    (tmp_path / 'latest.pt').write_bytes(content)
    with pytest.raises(ValueError, match=f'latest.pt \\({len(content)} bytes\\) is not a loadable checkpoint'):
        load_checkpoint(tmp_path / 'latest.pt')


def test_a_plain_state_dict_is_not_ours(tmp_path):
    torch.save(nn.Linear(2, 3).state_dict(), tmp_path / 'plain.pt')
    with pytest.raises(ValueError, match="plain.pt is not a checkpoint of train.py .*'encoder'"):
        checkpoint.load_ours(tmp_path / 'plain.pt')
    with pytest.raises(ValueError, match='not a checkpoint of train.py'):
        load_captioner(checkpoint=str(tmp_path / 'plain.pt'))


@pytest.fixture(scope='module')
def trained(tiny_coco, tiny_vocab, tmp_path_factory):
    """models/ of a one-step train.py run."""
    from conftest import train_args
    models = tmp_path_factory.mktemp('trained')
    run('train.py', *train_args(tiny_coco, tiny_vocab, models, '--dry_run', '--batch_size', 4))
    return models


def _one_line(proc, *parts):
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in parts:
        assert part in proc.stderr, proc.stderr


def test_broken_checkpoints_are_one_line_in_sample_and_evaluate(tiny_coco, tmp_path):
    (tmp_path / 'empty.pt').write_bytes(b'')
    torch.save(nn.Linear(2, 3).state_dict(), tmp_path / 'plain.pt')
    image = os.path.join(tiny_coco[0], 'img_000.png')
    for name, says in (('empty.pt', 'empty.pt (0 bytes) is not a loadable checkpoint'),
                       ('plain.pt', 'plain.pt is not a checkpoint of train.py')):
        _one_line(run('sample.py', '--image', image, '--checkpoint', tmp_path / name, check=False), says)
        _one_line(run('evaluate.py', '--image_dir', tiny_coco[0], '--caption_path', tiny_coco[1],
                      '--checkpoint', tmp_path / name, '--results_path', tmp_path / 'results.json', check=False), says)


def test_our_checkpoint_as_decoder_path_refuses_another_vocab(tiny_coco, tiny_vocab, trained):
    proc = run('sample.py', '--image', os.path.join(tiny_coco[0], 'img_000.png'), '--decoder_path',
               trained / 'latest.pt', '--vocab_path', tiny_vocab, check=False)
    _one_line(proc, 'is a checkpoint of train.py', 'drop --vocab_path', f'--checkpoint {trained / "latest.pt"}')
