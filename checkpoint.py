"""Checkpoints and encoder weights: everything that puts a model on disk or takes it off.

A checkpoint is a dict of plain objects (nanoGPT, pytorch/examples imagenet), loaded
with ``torch.load(weights_only=True)`` so that no file this repository reads can run code:

    {'encoder': state_dict of encoder.linear and encoder.bn (the frozen ResNet is not stored),
     'encoder_weights': how to rebuild the frozen ResNet, see `encoder_spec`,
     'decoder': decoder.state_dict(),
     'vocab': list of words in id order,
     'args': vars(args) of train.py (embed_size, hidden_size, num_layers, crop_size, ...;
             decoder: 'rnn' or 'attention', and grid_size: which decoder it holds, see build_decoder),
     'optimizer', 'epoch', 'step', 'best_val_loss', 'rng', ...: train.py's resume state}

`load_captioner` rebuilds (encoder, decoder, vocab) from such a file, or from the
tutorial's published files (encoder-5-3000.pkl, decoder-5-3000.pkl, vocab.pkl).
"""
import os
import socket
import warnings
from dataclasses import dataclass

import torch
from torchvision.models import ResNet152_Weights

from model import AttentionDecoder, DecoderRNN, EncoderCNN
from utils import atomic_write, file_sha256
from vocab import Vocabulary, load_vocab

IMAGENET_WEIGHTS = ResNet152_Weights.IMAGENET1K_V1  # what the tutorial's encoder used


class EncoderWeightsError(RuntimeError):
    """The requested ResNet-152 weights cannot be had (not cached, no network, bad file)."""


# ---------------------------------------------------------------------------
# Encoder weights: 'imagenet', 'none' (random, seeded) or a path

def encoder_spec(encoder_weights, seed=0):
    """Turn the --encoder_weights flag into a record that rebuilds exactly that encoder.

    'imagenet' -> {'source': 'imagenet', 'name': 'IMAGENET1K_V1'}
    'none'     -> {'source': 'none', 'seed': seed}          random init under torch.manual_seed(seed)
    PATH       -> {'source': 'file', 'path': ..., 'sha256': ...}
    """
    if encoder_weights == 'imagenet':
        return {'source': 'imagenet', 'name': IMAGENET_WEIGHTS.name}
    if encoder_weights == 'none':
        return {'source': 'none', 'seed': int(seed)}
    if not os.path.isfile(encoder_weights):
        raise EncoderWeightsError(
            f"--encoder_weights: {encoder_weights!r} is neither 'imagenet', 'none' nor an existing file")
    return {'source': 'file', 'path': os.path.abspath(encoder_weights), 'sha256': file_sha256(encoder_weights)}


def encoder_id(spec):
    """A short string naming the frozen ResNet's weights (keys the feature cache)."""
    if spec['source'] == 'imagenet':
        return f"imagenet:{spec['name']}"
    if spec['source'] == 'none':
        return f"random:seed={spec['seed']}"
    return f"file:{spec['sha256']}"


def imagenet_cache_path():
    """Where torchvision looks for (and downloads) the ResNet-152 ImageNet weights."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(IMAGENET_WEIGHTS.url))


def ensure_imagenet_weights():
    """The path of the ResNet-152 ImageNet weights in torch's cache, downloading them when
    missing. Without a network that stops with a message saying where to put the file."""
    path = imagenet_cache_path()
    if os.path.exists(path):
        return path
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a firewall that drops packets would otherwise hang here forever
    try:  # torchvision downloads into the same cache when it can reach the network
        torch.hub.load_state_dict_from_url(IMAGENET_WEIGHTS.url, progress=True, check_hash=True)
    except Exception as e:  # no network, proxy refused, disk full: all say the same to the user
        raise EncoderWeightsError(
            f"ResNet-152 ImageNet weights not found: {os.path.basename(path)} is not in {os.path.dirname(path)} "
            f"and downloading {IMAGENET_WEIGHTS.url} failed ({type(e).__name__}). Download it where you have "
            f"a network and copy it into {os.path.dirname(path)}/ (or pass --encoder_weights PATH), "
            f"or run with --encoder_weights none for random encoder weights") from None
    finally:
        socket.setdefaulttimeout(timeout)
    return path


# --decoder: 'rnn' is the tutorial's DecoderRNN (and every checkpoint written before the flag),
# 'attention' is AttentionDecoder over EncoderCNN(grid_size=G) regions
DECODERS = ('rnn', 'attention')


def build_decoder(args, vocab_size):
    """The decoder a train.py args dict names (args['decoder'], 'rnn' when absent), untrained."""
    if args.get('decoder', 'rnn') == 'attention':
        return AttentionDecoder(args['embed_size'], args['hidden_size'], vocab_size, args.get('max_seq_length', 20))
    return DecoderRNN(args['embed_size'], args['hidden_size'], vocab_size, args['num_layers'],
                      args.get('max_seq_length', 20))


def grid_size(args):
    """The encoder's grid_size for the decoder an args dict names: 0 (one pooled vector) for 'rnn'."""
    return args['grid_size'] if args.get('decoder', 'rnn') == 'attention' else 0


def build_encoder(embed_size, spec):
    """EncoderCNN(embed_size) with its frozen ResNet-152 rebuilt from an `encoder_spec` record.

    ImageNet weights come from torch's cache, or a download; without both this stops
    with a message saying where to put the file. It never falls back to random weights.
    """
    # A random-weight ResNet's activations fall into float32's denormal range, where x86 CPUs
    # compute many times slower; flushing them to zero (process-wide) changes values by less
    # than 1e-38. Every script builds its encoder here, so every script gets it.
    torch.set_flush_denormal(True)
    if spec['source'] == 'imagenet':
        ensure_imagenet_weights()
        return EncoderCNN(embed_size, weights=IMAGENET_WEIGHTS)
    if spec['source'] == 'none':
        # torchvision initialises from the global RNG: seed it, without disturbing the caller's stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec['seed'])
            encoder = EncoderCNN(embed_size, weights=None)
        scale_residual_branches(encoder.resnet)
        return encoder
    # a file: torchvision's resnet152 state dict, or an EncoderCNN's (the tutorial's encoder-*.pkl)
    path = spec['path']
    if not os.path.isfile(path):
        raise EncoderWeightsError(f"encoder weights file {path} not found: pass --encoder_weights PATH")
    if file_sha256(path) != spec['sha256']:
        warnings.warn(f"encoder weights file {path} changed since the checkpoint was written")
    encoder = EncoderCNN(embed_size, weights=None)
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = {k[len('resnet.'):] if k.startswith('resnet.') else _resnet_key(k): v
             for k, v in state.items() if not k.startswith(('fc.', 'linear.', 'bn.'))}
    try:
        encoder.resnet.load_state_dict(state)
    except RuntimeError as e:
        raise EncoderWeightsError(f"{path} is not a ResNet-152 state dict: {str(e).splitlines()[0]}") from None
    return encoder


def scale_residual_branches(resnet):
    """Make a randomly initialised ResNet-152 a usable frozen feature extractor.

    With torchvision's random init and eval-mode BatchNorm (running mean 0, variance 1),
    each of the 50 residual blocks adds its branch to the signal, and layer3's 36 blocks
    blow the activations up ~10^4 times: the pooled features of different pictures then
    differ along one direction only (measured on the test pictures: the second singular
    value of the centred features is 2% of the first), and the decoder cannot tell the
    pictures apart. Scaling each branch's last BatchNorm by 1/sqrt(number of blocks)
    keeps the activations bounded, as SkipInit does (De & Smith 2020,
    https://arxiv.org/abs/2002.10444), and the features keep ~10 usable directions.
    Only --encoder_weights none does this; trained weights are never touched.
    """
    blocks = [m for m in resnet.modules() if hasattr(m, 'bn3')]  # torchvision's Bottleneck blocks
    with torch.no_grad():
        for block in blocks:
            block.bn3.weight.mul_(len(blocks) ** -0.5)


_TORCHVISION_NAMES = ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'avgpool']


def _resnet_key(key):
    """torchvision's 'layer1.0.conv1.weight' -> nn.Sequential's '4.0.conv1.weight'."""
    head, _, rest = key.partition('.')
    return f'{_TORCHVISION_NAMES.index(head)}.{rest}' if head in _TORCHVISION_NAMES else key


# ---------------------------------------------------------------------------
# Saving and loading

def save_checkpoint(obj, path):
    """torch.save through utils.atomic_write: a crash or a full disk while saving leaves the
    previous file at `path` intact and no temporary file behind.

    Raises OSError when the file cannot be written (torch.save reports a full disk as a
    RuntimeError from its zip writer: that becomes an OSError naming the file too)."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except RuntimeError as e:
        raise OSError(f'torch.save could not write {path} ({str(e).strip() or type(e).__name__}; '
                      f'is the disk full?)') from None


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True (tensors and plain containers only).

    A missing file raises FileNotFoundError; any other file torch cannot load (empty,
    truncated, not a torch file, or one that would run code) raises ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: train a model first (python train.py)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        size = os.path.getsize(path)
        raise ValueError(f"{path} ({size} bytes) is not a loadable checkpoint ({reason}): it may be truncated "
                         f"or not a torch file; pass one train.py wrote, e.g. models/latest.pt") from None


# what every train.py checkpoint holds, whatever its version
CHECKPOINT_KEYS = ('encoder', 'decoder', 'vocab', 'args', 'encoder_weights')


def load_ours(path, map_location='cpu'):
    """load_checkpoint, then check that it is a checkpoint of train.py (ValueError if not)."""
    ckpt = load_checkpoint(path, map_location)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py (it has no {', '.join(map(repr, missing))}): "
                         f"pass one train.py wrote, e.g. models/latest.pt, or the tutorial's files with "
                         f"--encoder_path, --decoder_path and --vocab_path")
    return ckpt


def default_checkpoint(model_path):
    """The model sample.py and evaluate.py take without --checkpoint: best.pt, the one train.py
    keeps as the best, else latest.pt; None when model_path has neither."""
    for name in ('best.pt', 'latest.pt'):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            return path
    return None


def describe(path, ckpt):
    """One line naming a checkpoint for the user, in train.py's epoch numbering, e.g.
    'models/best.pt (after epoch [1/2], validation loss 3.1234)'."""
    args = ckpt.get('args', {})
    total = args.get('num_epochs', '?')
    validated = [row for row in ckpt.get('history', []) if row.get('split') == 'val']
    parts = []
    if ckpt.get('step'):
        parts.append(f"epoch [{ckpt['epoch']}/{total}] at step {ckpt['step']}")
    if validated:
        last = validated[-1]
        parts.append(f"after epoch [{last['epoch']}/{total}], validation loss {last['loss']:.4f}")
        best = ckpt.get('best') or {}
        select_by = args.get('select_by', 'loss')
        if select_by != 'loss' and best.get('global_step') == last['global_step']:
            parts[-1] += f", {select_by} {best['score']:.2f}"
    elif 'epoch' in ckpt:
        parts.append('not validated yet')
    return f"{path} ({'; '.join(parts)})" if parts else str(path)


def encoder_state(encoder):
    """The trainable part of the encoder's state: linear and bn, not the frozen ResNet."""
    return {k: v for k, v in encoder.state_dict().items() if not k.startswith('resnet.')}


def add_model_args(parser):
    """The flags that say which model to load (sample.py and evaluate.py): a checkpoint of
    train.py, or the tutorial's three files; they go to `load_captioner` by the same names."""
    parser.add_argument('--checkpoint', type=str, default=None,
                        help='a train.py checkpoint; not given: best.pt in --model_path, else latest.pt')
    parser.add_argument('--model_path', type=str, default='models/', help='where train.py wrote its checkpoints')
    parser.add_argument('--encoder_path', type=str, default=None, help="the tutorial's encoder-*.pkl")
    parser.add_argument('--decoder_path', type=str, default=None,
                        help="the tutorial's decoder-*.pkl (or a train.py checkpoint)")
    parser.add_argument('--vocab_path', type=str, default=None, help="the tutorial's vocab.pkl")
    parser.add_argument('--encoder_weights', type=str, default=None,
                        help="override the frozen ResNet's weights the checkpoint records: 'imagenet', 'none' or a path")


def add_decoding_args(parser, beam_size):
    """The flags that say how to decode (sample.py: greedy, beam_size=1, the tutorial's;
    evaluate.py: beam_size=3); they go to DecoderRNN.generate by the same names."""
    parser.add_argument('--beam_size', type=int, default=beam_size, help='hypotheses kept per image (1: greedy)')
    parser.add_argument('--length_penalty', type=float, default=0.0,
                        help='beam search ranks by log p / length**alpha (0: plain log p)')
    parser.add_argument('--max_seq_length', '--max_length', type=int, default=None,
                        help="longest caption in tokens, <start> and <end> included; not given: the model's (20)")


@dataclass
class Captioner:
    """What sample.py and evaluate.py need: the two halves, the words, the preprocessing."""
    encoder: EncoderCNN
    decoder: DecoderRNN  # or AttentionDecoder
    vocab: Vocabulary
    image_size: int  # resize.py's square size
    crop_size: int   # the centre crop fed to the ResNet
    source: str      # one line naming the file(s) it came from, for the user to see


def load_captioner(checkpoint=None, encoder_path=None, decoder_path=None, vocab_path=None,
                   model_path='models/', encoder_weights=None, device='cpu'):
    """Rebuild a captioner in eval mode on `device`.

    Either a checkpoint of train.py (by default best.pt in model_path, else latest.pt), or
    the tutorial's three files: --encoder_path (a full EncoderCNN state dict with the
    ResNet), --decoder_path (DecoderRNN with nn.LSTM keys) and --vocab_path.
    `encoder_weights` ('imagenet', 'none' or a path) overrides the recorded encoder.
    """
    if decoder_path is not None:
        state = load_checkpoint(decoder_path)
        if 'decoder' in state:  # one of ours, passed under the tutorial's flag
            others = [f'--{n}' for n, v in (('encoder_path', encoder_path), ('vocab_path', vocab_path)) if v]
            if others:
                raise ValueError(f"{decoder_path} is a checkpoint of train.py: it carries its own encoder and "
                                 f"vocabulary, which {' and '.join(others)} cannot replace; drop "
                                 f"{' and '.join(others)} (or pass it as --checkpoint {decoder_path})")
            checkpoint = decoder_path
        else:
            cap = _load_tutorial(encoder_path, state, vocab_path, encoder_weights, decoder_path)
            return _to(cap, device)
    if checkpoint is None:
        checkpoint = default_checkpoint(model_path)
        if checkpoint is None:
            raise FileNotFoundError(f"no best.pt or latest.pt in {model_path}: train a model first (python train.py), "
                                    f"or pass --checkpoint, or --encoder_path, --decoder_path and --vocab_path")
    ckpt = load_ours(checkpoint)
    args = ckpt['args']
    spec = encoder_spec(encoder_weights, args.get('seed', 0)) if encoder_weights else ckpt['encoder_weights']
    encoder = build_encoder(args['embed_size'], spec)
    encoder.grid_size = grid_size(args)
    missing, unexpected = encoder.load_state_dict(ckpt['encoder'], strict=False)
    assert not unexpected and all(k.startswith('resnet.') for k in missing), 'encoder state mismatch'
    # a sha256 string; some checkpoints hold a float checksum instead, which no longer has a
    # counterpart to compare with
    fingerprint = ckpt.get('encoder_fingerprint')
    if isinstance(fingerprint, str) and fingerprint != encoder.fingerprint():
        warnings.warn(f"{checkpoint}: the rebuilt ResNet ({encoder_id(spec)}) differs from the one it was "
                      f"trained with (another torch version initialises differently?); captions may be off")
    vocab = Vocabulary.from_words(ckpt['vocab'])
    decoder = build_decoder(args, len(vocab))
    decoder.load_state_dict(ckpt['decoder'])
    cap = Captioner(encoder, decoder, vocab, args.get('image_size', 256), args['crop_size'],
                    describe(checkpoint, ckpt))
    return _to(cap, device)


def _load_tutorial(encoder_path, decoder_state, vocab_path, encoder_weights, decoder_path):
    """The tutorial's files: sizes are read off the tensors, so no --embed_size mismatch."""
    if encoder_path is None or vocab_path is None:
        raise ValueError(f"{decoder_path} is a tutorial-style decoder: pass --encoder_path and --vocab_path with it")
    vocab_size, embed_size = decoder_state['embed.weight'].shape
    hidden_size = decoder_state['linear.weight'].shape[1]
    num_layers = sum(1 for k in decoder_state if k.startswith('lstm.weight_ih_l') and not k.endswith('_reverse'))
    vocab = load_vocab(vocab_path)
    if len(vocab) != vocab_size:
        raise ValueError(f"{vocab_path} has {len(vocab)} words but {decoder_path} was trained with {vocab_size}: "
                         f"pass the vocab.pkl it was trained with")
    decoder = DecoderRNN(embed_size, hidden_size, vocab_size, num_layers)
    decoder.load_state_dict(decoder_state)  # my_LSTM accepts nn.LSTM's keys
    encoder_state_dict = load_checkpoint(encoder_path)
    if any(k.startswith('resnet.') for k in encoder_state_dict):  # the tutorial saved the whole ResNet too
        encoder = EncoderCNN(embed_size, weights=None)
        encoder.load_state_dict(encoder_state_dict)
    else:
        encoder = build_encoder(embed_size, encoder_spec(encoder_weights or 'imagenet'))
        encoder.load_state_dict(encoder_state_dict, strict=False)
    # the tutorial's sample.py resized straight to 224 x 224: keep its preprocessing
    return Captioner(encoder, decoder, vocab, 224, 224, f'{encoder_path} + {decoder_path}')


def _to(cap, device):
    cap.encoder.to(device).eval()
    cap.decoder.to(device).eval()
    return cap
