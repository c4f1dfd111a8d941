"""The captioning model: a frozen ResNet-152 encoder and an LSTM decoder.

    image (3, H, W) --EncoderCNN--> feature (E,) --DecoderRNN--> <start> a group of giraffes ... <end>

This file only defines modules: no argparse, no paths, no file I/O (checkpoint.py
loads and saves them). Submodule names are the tutorial's (`resnet`, `linear`, `bn`,
`embed`, `lstm`, `linear`) so its published checkpoints load unchanged.
"""
import torch
import torch.nn as nn
import torchvision.models as models
from torch.nn.utils.rnn import pack_padded_sequence

from DIY_LSTM import my_LSTM


class EncoderCNN(nn.Module):
    r"""ResNet-152 without its classifier, then a trainable projection to the embedding.

    The ResNet is frozen for real: its parameters need no gradient, and it stays in
    eval mode even under ``encoder.train()``, so its BatchNorm running statistics
    never drift. (The tutorial's encoder put the whole ResNet in train mode; its
    ``torch.no_grad()`` stopped the gradients but not the BatchNorm updates.)

    Args:
        embed_size: E, the size of the image embedding fed to the decoder
        weights: a torchvision ``ResNet152_Weights`` (the tutorial used IMAGENET1K_V1),
            or None for random initialisation. Default: None

    Inputs: images
        * images: (N, 3, H, W), normalised with ImageNet's mean and std

    Outputs: features
        * features: (N, E)

    where: N = batch size, E = embed_size, H x W = crop size (224 for COCO)

    Examples::

        >>> encoder = EncoderCNN(256).eval()
        >>> encoder(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 256])
    """

    def __init__(self, embed_size, weights=None):
        super().__init__()
        resnet = models.resnet152(weights=weights)
        # (N, 3, H, W) -> (N, 2048, 1, 1): everything up to and including the average pool
        self.resnet = nn.Sequential(*list(resnet.children())[:-1])
        self.resnet.requires_grad_(False)
        self.linear = nn.Linear(resnet.fc.in_features, embed_size)
        # momentum=0.01 is the tutorial's: its running statistics need a few hundred
        # steps to settle (see `recalibrate_bn` in train.py for short runs)
        self.bn = nn.BatchNorm1d(embed_size, momentum=0.01)
        self.resnet.eval()

    def train(self, mode=True):
        super().train(mode)
        self.resnet.eval()  # frozen means frozen: no BatchNorm statistics updates either
        return self

    @torch.no_grad()
    def extract(self, images):
        """The frozen part: (N, 3, H, W) images -> (N, 2048) pooled ResNet features."""
        return self.resnet(images).flatten(1)  # (N, 2048)

    def project(self, features):
        """The trainable part: (N, 2048) pooled features -> (N, E) embeddings."""
        return self.bn(self.linear(features))  # (N, E)

    def forward(self, images):
        return self.project(self.extract(images))


class DecoderRNN(nn.Module):
    r"""An LSTM language model conditioned on the image, which it sees as its first input.

    Training uses teacher forcing: the decoder reads the image feature, then the
    caption, and at each position predicts the next token::

        input : feature  <start>   a      dog    runs
        target: <start>    a      dog    runs   <end>

    so a caption of length L (with <start> and <end>) gives L predictions.

    Args:
        embed_size: E, the size of word embeddings and of the image feature
        hidden_size: H, the LSTM's hidden size
        vocab_size: V
        num_layers: number of stacked LSTM layers
        max_seq_length: how many tokens ``sample`` generates. Default: 20

    Inputs: features, captions, lengths
        * features: (N, E), from EncoderCNN
        * captions: LongTensor of shape (N, L), padded, sorted by length (longest first)
        * lengths: list of N ints, the captions' lengths, non-increasing

    Outputs: logits
        * logits: (sum(lengths), V), in ``pack_padded_sequence`` order, so the targets are
          ``pack_padded_sequence(captions, lengths, batch_first=True).data``

    where: N = batch size, L = longest caption, E = embed_size, V = vocab_size

    Examples::

        >>> decoder = DecoderRNN(8, 16, vocab_size=10, num_layers=1)
        >>> captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
        >>> decoder(torch.randn(2, 8), captions, [4, 3]).shape
        torch.Size([7, 10])
    """

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers, max_seq_length=20):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        # The lab's hand-written LSTM. To check the environment against PyTorch's own,
        # swap in the line below it: both take the same arguments and state dicts.
        self.lstm = my_LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        # self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seg_length = max_seq_length  # the tutorial's spelling, kept for its users

    def forward(self, features, captions, lengths):
        embeddings = self.embed(captions)                               # (N, L, E)
        embeddings = torch.cat((features.unsqueeze(1), embeddings), 1)  # (N, 1+L, E)
        # packing drops each caption's last input (its <end>): nothing follows it
        packed = pack_padded_sequence(embeddings, lengths, batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(hiddens.data)                                # (sum(lengths), V)

    @torch.no_grad()
    def sample(self, features, states=None):
        """Greedy decoding: (N, E) features -> LongTensor (N, max_seg_length) token ids.

        The first predicted token is <start>, as in the tutorial; the caller cuts each
        caption after its first <end>.
        """
        sampled_ids = []
        inputs = features.unsqueeze(1)                     # (N, 1, E)
        for _ in range(self.max_seg_length):
            hiddens, states = self.lstm(inputs, states)    # (N, 1, H)
            outputs = self.linear(hiddens.squeeze(1))      # (N, V)
            predicted = outputs.argmax(1)                  # (N,)
            sampled_ids.append(predicted)
            inputs = self.embed(predicted).unsqueeze(1)    # (N, 1, E)
        return torch.stack(sampled_ids, 1)                 # (N, max_seg_length)
