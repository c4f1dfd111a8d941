"""Where the attention decoder looks: the picture once per generated word, with that word's
attention weights laid over it, and the word under it (Show, Attend and Tell's figure).

    $ python sample.py --image png/shapes_example.png --attention attention.png

`record_attention` runs AttentionDecoder's greedy decoding (the caption sample.py prints with
the default --beam_size 1) and keeps each step's weights over the R = G x G regions;
`plot_attention` draws them: each G x G map upsampled to the crop the ResNet saw and smoothed
with a Gaussian, as the paper's figures are (https://arxiv.org/abs/1502.03044, figs. 2-3),
bright where the decoder looked.
"""
import math
import warnings

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from data_loader import IMAGENET_MEAN, IMAGENET_STD
from gates import caption_words
from utils import atomic_write


def record_attention(decoder, features, max_seq_length=None):
    """Caption one picture greedily and keep the attention weights of every step.

    Args:
        decoder: an AttentionDecoder
        features: (1, R, E), from EncoderCNN(grid_size=G)
        max_seq_length: tokens generated at most. Default: None (the decoder's own)

    Returns: ids, a list of T ints (from <start>, up to and including <end> when it came),
        and alphas (T, R): row t holds the weights with which token t was written.
    """
    if not hasattr(decoder, 'attend'):
        raise ValueError(f'attention: the model holds a {type(decoder).__name__}, which has no attention: '
                         f'train one with --decoder attention')
    if features.dim() != 3 or features.size(0) != 1:
        raise ValueError(f'attention: Expected features of one picture, shape (1, R, E), got {tuple(features.shape)}')
    ids, alphas = decoder.sample(features, max_seq_length=max_seq_length, return_alphas=True)
    ids = ids[0].tolist()
    T = ids.index(2) + 1 if 2 in ids else len(ids)  # <end> is id 2 (vocab.Vocabulary)
    return ids[:T], alphas[0, :T].float().cpu()


def smooth_map(alpha, size):
    """(R,) weights of a G x G grid -> (size, size) map in [0, 1]: upsampled bilinearly, blurred
    with a Gaussian of about a third of a region, and scaled so its largest value is 1."""
    grid = math.isqrt(alpha.numel())
    up = F.interpolate(alpha.view(1, 1, grid, grid), size=(size, size), mode='bilinear', align_corners=False)
    sigma = max(size / grid / 3, 0.5)
    up = TF.gaussian_blur(up, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)   # (1, 1, size, size)
    return (up / up.max().clamp(min=1e-12)).view(size, size)


def crop_pixels(picture):
    """The crop the ResNet saw: (1, 3, S, S) normalised tensor -> (S, S, 3) floats in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (picture[0].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def attention_figure(pixels, words, alphas, columns=5):
    """A matplotlib Figure (no pyplot, no display needed): one panel per word, the picture
    darkened where the word's attention is low, the word and its largest weight under it."""
    from matplotlib.figure import Figure

    rows = math.ceil(len(words) / columns)
    size = pixels.size(0)
    fig = Figure(figsize=(2.3 * min(columns, len(words)), 2.6 * rows), layout='constrained')
    axes = fig.subplots(rows, min(columns, len(words)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(words):
            continue
        heat = smooth_map(alphas[k], size)
        ax.imshow(pixels.numpy())
        # black over what was not looked at, as in the paper's figures
        ax.imshow(torch.zeros(size, size).numpy(), cmap='gray', vmin=0, vmax=1, alpha=0.8 * (1 - heat.numpy()))
        ax.set_title(f'{words[k]}\nmax weight {float(alphas[k].max()):.2f}', y=-0.22, fontsize=10)
    grid = math.isqrt(alphas.size(1))
    fig.suptitle(f'"{" ".join(w for w in words if w not in ("<start>", "<end>"))}"\n'
                 f'where the decoder looked for each word ({grid} x {grid} regions)', fontsize=11)
    return fig


def plot_attention(decoder, features, picture, vocab, path, max_seq_length=None, expected_ids=None):
    """Record one picture's greedy caption with its attention and write the figure to `path`
    (PNG, atomically). picture: (1, 3, S, S), the normalised crop the features came from.
    expected_ids: the tokens the caller printed; a warning says so if this run wrote others.
    Returns the caption's words."""
    ids, alphas = record_attention(decoder, features, max_seq_length=max_seq_length)
    if expected_ids is not None and [int(i) for i in expected_ids][:len(ids)] != ids:
        warnings.warn('attention: the recorded decoding wrote another caption than the one printed')
    words = caption_words(ids, vocab)
    fig = attention_figure(crop_pixels(picture), words, alphas[:len(words)])
    with atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=100)
    return words
