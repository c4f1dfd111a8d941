"""The captioning model: a frozen ResNet-152 encoder and an LSTM decoder.

    image (3, H, W) --EncoderCNN--> feature (E,) --DecoderRNN--> <start> a group of giraffes ... <end>

This file only defines modules: no argparse, no paths, no file I/O (checkpoint.py
loads and saves them). Submodule names are the tutorial's (`resnet`, `linear`, `bn`,
`embed`, `lstm`, `linear`) so its published checkpoints load unchanged.
"""
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as models
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from DIY_LSTM import my_LSTM, my_LSTMCell


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
        grid_size: G; 0 pools the last convolutional map to one vector (the tutorial's),
            G > 0 to a G x G grid of regions, each projected alike (AttentionDecoder's
            input). Default: 0

    Inputs: images
        * images: (N, 3, H, W), normalised with ImageNet's mean and std

    Outputs: features
        * features: (N, E), or (N, R, E) when grid_size > 0

    where: N = batch size, E = embed_size, H x W = crop size (224 for COCO),
        R = G * G regions, row-major from the top left

    Examples::

        >>> encoder = EncoderCNN(256).eval()
        >>> encoder(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 256])
    """

    def __init__(self, embed_size, weights=None, grid_size=0):
        super().__init__()
        self.grid_size = grid_size
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
        """The frozen part: (N, 3, H, W) images -> (N, 2048) pooled ResNet features, or
        (N, R, 2048) region features with grid_size > 0."""
        if not self.grid_size:
            return self.resnet(images).flatten(1)  # (N, 2048)
        maps = self.resnet[:-1](images)            # (N, 2048, h, w): layer4's map, before the pool
        grid = F.adaptive_avg_pool2d(maps, self.grid_size)  # (N, 2048, G, G)
        return grid.flatten(2).transpose(1, 2)     # (N, R, 2048)

    def project(self, features):
        """The trainable part: (N, 2048) pooled features -> (N, E) embeddings, or (N, R, 2048)
        regions -> (N, R, E), every region through the same linear and bn."""
        if features.dim() == 2:
            return self.bn(self.linear(features))  # (N, E)
        rows = self.bn(self.linear(features.flatten(0, 1)))  # (N*R, E): bn's statistics over all regions
        return rows.view(features.shape[:2] + rows.shape[1:])  # (N, R, E)

    def forward(self, images):
        return self.project(self.extract(images))

    def fingerprint(self):
        """sha256 hex digest of the frozen ResNet's parameters and buffers (BatchNorm statistics
        included): names its exact weights, e.g. to key the feature cache or to check that a
        rebuilt 'random:seed=0' ResNet (another torch version may initialise differently) is
        the one a checkpoint was trained with."""
        h = hashlib.sha256()
        for name, tensor in self.resnet.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            h.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype}'.encode())
            h.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # raw bytes: bf16 too
        return h.hexdigest()


class CaptionSearch:
    """Greedy and beam-search captioning for a decoder that defines the four `_search_*` hooks
    (start, step, reorder, inputs): DecoderRNN and AttentionDecoder share this one search.
    FEATURES names the dimensions of the features it takes, e.g. ('N', 'E')."""

    @torch.no_grad()
    def generate(self, features, beam_size=1, length_penalty=0.0, max_seq_length=None):
        """Caption features (N, E), or (N, R, E) for AttentionDecoder: a list of N lists of token ids (greedy: all max_seg_length
        of them; beam search: up to <end>); ``vocab.decode`` cuts after <end> and makes text.

        beam_size=1 with the model's own max_seq_length is sample(), the tutorial's greedy
        decoding, token for token; anything else is beam_search().
        """
        if beam_size == 1 and max_seq_length is None:
            return self.sample(features).tolist()
        return self.beam_search(features, beam_size=beam_size, max_seq_length=max_seq_length,
                                length_penalty=length_penalty)

    @torch.no_grad()
    def beam_search(self, features, beam_size=3, max_seq_length=None, length_penalty=0.0, end_id=2,
                    return_scores=False):
        r"""Beam search: the `beam_size` most likely captions, kept for every image at once.

        The decoding is sample()'s: the image feature is the first input, the first token
        the model predicts is normally <start>, and each predicted token is the next input.
        All N * K hypotheses advance together, one decoder step per call, on the features'
        device. A hypothesis ends when it predicts `end_id`; ended ones keep their place
        in the beam (with their score) until better ones push them out, and the search
        stops when every hypothesis of every image has ended, or after `max_seq_length` steps.

        Hypotheses are ranked by ``log p / L**length_penalty``, where log p is the sum of
        the log-probabilities of the L tokens generated (the leading <start> and the final
        <end> included). length_penalty=0 ranks by plain log p, the usual beam search;
        length_penalty=1 ranks by the mean log-probability per token, which undoes beam
        search's preference for short captions. (A simple form of the length normalisation
        of https://arxiv.org/abs/1609.08144, section 7.)

        beam_size=1 is greedy decoding: token for token sample()'s caption, cut after <end>.

        Args:
            beam_size: K, hypotheses kept per image. Default: 3
            max_seq_length: tokens generated at most, <start> and <end> included.
                Default: None (self.max_seg_length, as sample())
            length_penalty: alpha in the ranking above. Default: 0.0
            end_id: the id of <end>. Default: 2
            return_scores: also return each caption's log p. Default: False

        Inputs: features
            * features: (N, E), from EncoderCNN, or (N, R, E) for AttentionDecoder

        Outputs: captions, or (captions, scores) when return_scores=True
            * captions: list of N lists of token ids, the best hypothesis of each image,
              from the first predicted token (normally <start>) to <end> if it ended
            * scores: list of N floats, the sum of the log-probabilities of those tokens

        where: N = batch size, E = embed_size, K = beam_size

        Examples::

            >>> decoder = DecoderRNN(8, 16, vocab_size=10, num_layers=1).eval()
            >>> captions = decoder.beam_search(torch.randn(2, 8), beam_size=3, max_seq_length=5)
            >>> len(captions), all(1 <= len(c) <= 5 for c in captions)
            (2, True)
        """
        name = f'{type(self).__name__}.beam_search'
        if features.dim() != len(self.FEATURES):
            raise ValueError(f"{name}: Expected features of shape ({', '.join(self.FEATURES)}), "
                             f"got {tuple(features.shape)}")
        if beam_size < 1:
            raise ValueError(f"{name}: Expected beam_size >= 1, got {beam_size}")
        T = self.max_seg_length if max_seq_length is None else max_seq_length
        if T < 1:
            raise ValueError(f"{name}: Expected max_seq_length >= 1, got {max_seq_length}")
        N, K, device = features.size(0), beam_size, features.device

        # Hypothesis k of image n is row n*K + k everywhere (features, states, scores, tokens):
        #
        #   row:   0    1  ..  K-1 | K   K+1 .. 2K-1 | ...
        #   image: 0    0  ..  0   | 1   1   .. 1    | ...
        #
        # At the start only beam 0 of each image is live: the others score -inf, so the
        # first step's K best candidates all extend beam 0 (K copies of it would otherwise
        # fill the beam with the same caption).
        inputs, states = self._search_start(features, K)
        # log p sums in float32 at least, also for half-precision features (autocast)
        dtype = torch.promote_types(features.dtype, torch.float32)
        scores = torch.full((N, K), float('-inf'), dtype=dtype, device=device)
        scores[:, 0] = 0
        scores = scores.view(-1)                                        # (N*K,) sum of log p
        lengths = torch.zeros(N * K, dtype=torch.long, device=device)  # (N*K,) tokens generated
        ended = torch.zeros(N * K, dtype=torch.bool, device=device)    # (N*K,) has predicted end_id
        tokens = torch.empty(N * K, 0, dtype=torch.long, device=device)  # (N*K, t)
        offsets = torch.arange(N, device=device).unsqueeze(1) * K       # (N, 1) first row of each image

        for t in range(T):
            logits, states = self._search_step(inputs, states)          # (N*K, V)
            V = logits.size(1)
            logp = logits.log_softmax(1, dtype=dtype)                   # (N*K, V)
            # An ended hypothesis has exactly one continuation, itself, at no cost: column
            # end_id gets log p 0 and every other column -inf (its later tokens are ignored).
            logp = torch.where(ended.unsqueeze(1), self._ended_row(V, end_id, logp), logp)
            if K == 1:
                # Greedy. Take the argmax of the logits, as sample() does, not of the log p:
                # log_softmax could round two nearly equal logits to one value.
                new = torch.where(ended, end_id, logits.argmax(1))      # (N,)
                parents = torch.arange(N, device=device)                # (N,) each its own parent
                scores = scores + logp.gather(1, new.unsqueeze(1)).squeeze(1)
            else:
                candidates = (scores.unsqueeze(1) + logp).view(N, K * V)  # (N, K*V) log p if extended so
                # rank by log p / L**alpha, L being the candidate's length: t+1 if it is
                # extended now, its own length if it had ended
                rank = candidates
                if length_penalty:
                    length = torch.where(ended, lengths, t + 1).to(scores.dtype)  # (N*K,)
                    rank = candidates / length.pow(length_penalty).repeat_interleave(V).view(N, K * V)
                best = rank.topk(K, dim=1).indices                      # (N, K) into K*V
                new = (best % V).view(-1)                               # (N*K,) token chosen
                parents = (best // V + offsets).view(-1)                # (N*K,) row it extends
                scores = candidates.gather(1, best).view(-1)            # (N*K,)
            # Reorder everything by parent.
            was_ended = ended.index_select(0, parents)
            lengths = torch.where(was_ended, lengths.index_select(0, parents), t + 1)
            ended = was_ended | (new == end_id)
            tokens = torch.cat((tokens.index_select(0, parents), new.unsqueeze(1)), 1)  # (N*K, t+1)
            states = self._search_reorder(states, parents)
            # done: every hypothesis has ended, or is a dead (-inf) slot of a beam wider than
            # the candidates so far. (One sync with the device a step; it saves the rest.)
            if bool((ended | scores.isinf()).all()):
                break
            inputs = self._search_inputs(new)

        # the best hypothesis of each image by the same ranking
        rank = scores / lengths.clamp(min=1).to(scores.dtype).pow(length_penalty)
        best = (rank.view(N, K).argmax(1) + offsets.squeeze(1)).tolist()  # N rows
        tokens, lengths, scores = tokens.tolist(), lengths.tolist(), scores.tolist()
        captions = [tokens[r][:lengths[r]] for r in best]
        if return_scores:
            return captions, [scores[r] for r in best]
        return captions

    @staticmethod
    def _ended_row(V, end_id, like):
        """(1, V) log-probabilities of an ended hypothesis: 0 at end_id, -inf elsewhere."""
        row = torch.full((1, V), float('-inf'), dtype=like.dtype, device=like.device)
        row[0, end_id] = 0
        return row


class DecoderRNN(CaptionSearch, nn.Module):
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

    FEATURES = ('N', 'E')

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

    # beam search's hooks (CaptionSearch): one step of all N*K hypotheses at once

    def _search_start(self, features, K):
        """First inputs (N*K, 1, E), the image feature of each hypothesis, and the state (None: zeros)."""
        return features.repeat_interleave(K, 0).unsqueeze(1), None

    def _search_step(self, inputs, states):
        hiddens, states = self.lstm(inputs, states)                     # (N*K, 1, H)
        return self.linear(hiddens.squeeze(1)), states                  # (N*K, V)

    def _search_reorder(self, states, parents):
        return tuple(s.index_select(1, parents) for s in states)        # (num_layers, N*K, H): dim 1

    def _search_inputs(self, tokens):
        return self.embed(tokens).unsqueeze(1)                          # (N*K, 1, E)


class AttentionDecoder(CaptionSearch, nn.Module):
    r"""Show, Attend and Tell (Xu et al. 2015, https://arxiv.org/abs/1502.03044): an LSTM that
    looks again at a grid of image regions before every word, stepping the lab's my_LSTMCell.

    The regions a_1..a_R come from EncoderCNN(grid_size=G). At each step t (paper's symbols
    left, the code's names right; docs/attention.md has the whole table)::

        h_0, c_0 = tanh(f_init,h(mean a)), tanh(f_init,c(mean a))       init_h, init_c
        e_ti     = w^T tanh(W_a a_i + W_h h_{t-1})                     att, att_regions, att_hidden
        alpha_t  = softmax_i(e_ti)                                      alphas (sum to 1 over R)
        z_t      = sigmoid(f_beta(h_{t-1})) * sum_i alpha_ti a_i        f_beta: the gate beta_t
        h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))          cell (my_LSTMCell)
        p(y_t)   = softmax(L_o dropout(h_t))                            linear, dropout

    As in DecoderRNN, step 0 reads the picture in the word's place (here the mean region
    a-bar, also of size E), so its first prediction is <start> and a caption of length L
    gives L predictions: the two decoders train on the same targets and decode alike.
    Training adds the doubly stochastic penalty, `doubly_stochastic`.

    The batch comes sorted by caption length and shrinks as captions end (lstm_layer's
    batch_sizes): a finished caption's state is never touched again.

    Args:
        embed_size: E, word embeddings and region features alike
        hidden_size: H, the LSTM's hidden size, also the attention's inner size
        vocab_size: V
        max_seq_length: how many tokens ``sample`` generates at most. Default: 20
        dropout: before the word classifier, in training. Default: 0.5
        cell: the recurrent step's class, my_LSTMCell or nn.LSTMCell (same arguments and
            state dict, so either loads the other's weights). Default: my_LSTMCell

    Inputs: features, captions, lengths
        * features: (N, R, E), from EncoderCNN(grid_size=G)
        * captions: LongTensor of shape (N, L), padded, sorted by length (longest first)
        * lengths: list of N ints, the captions' lengths, non-increasing

    Outputs: logits, or (logits, alphas) with return_alphas=True
        * logits: (sum(lengths), V), in ``pack_padded_sequence`` order, as DecoderRNN's
        * alphas: (sum(lengths), R), each step's attention weights, in the same order

    where: N = batch size, R = G * G regions, L = longest caption, E = embed_size, H = hidden_size

    Examples::

        >>> decoder = AttentionDecoder(8, 16, vocab_size=10)
        >>> captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
        >>> decoder(torch.randn(2, 4, 8), captions, [4, 3]).shape
        torch.Size([7, 10])
    """
    FEATURES = ('N', 'R', 'E')

    def __init__(self, embed_size, hidden_size, vocab_size, max_seq_length=20, dropout=0.5, cell=my_LSTMCell):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.init_h = nn.Linear(embed_size, hidden_size)
        self.init_c = nn.Linear(embed_size, hidden_size)
        # additive attention (Bahdanau et al., https://arxiv.org/abs/1409.0473)
        self.att_regions = nn.Linear(embed_size, hidden_size)   # W_a
        self.att_hidden = nn.Linear(hidden_size, hidden_size)   # W_h
        self.att = nn.Linear(hidden_size, 1)                    # w
        # the gate beta: one scalar per step in the paper, one per feature here (as in
        # sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning)
        self.f_beta = nn.Linear(hidden_size, embed_size)
        self.cell = cell(2 * embed_size, hidden_size)           # input [E y_{t-1}; z_t]
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seg_length = max_seq_length  # DecoderRNN's name
        self._flatten_cell()

    def _flatten_cell(self):
        # As my_LSTM does: the cell's parameters live in one buffer in nn.LSTMCell's layout from
        # the start (fused_lstm.flatten), not only after the first decoding step moved them there,
        # so every process, a resumed one too, trains on the same memory layout: the matmul
        # library's rounding can depend on it.
        if isinstance(self.cell, my_LSTMCell):
            fused_lstm.flatten(self.cell)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(), .double(): new memory, flattened there at once
        self._flatten_cell()
        return self

    def init_state(self, features):
        """(h_0, c_0), each (N, H), from the mean region (N, R, E)."""
        mean = features.mean(1)                                 # (N, E)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def attend(self, features, projected, h):
        """The gated context z (N, E) and the weights alpha (N, R) from regions (N, R, E),
        their projection W_a a (N, R, H) and the previous hidden state h (N, H)."""
        scores = self.att(torch.tanh(projected + self.att_hidden(h).unsqueeze(1))).squeeze(2)  # (N, R)
        alpha = scores.softmax(1)                                                           # (N, R)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)                        # (N, E)
        return torch.sigmoid(self.f_beta(h)) * context, alpha

    def forward(self, features, captions, lengths, return_alphas=False):
        if features.dim() != 3:
            raise ValueError(f"AttentionDecoder: Expected features of shape (N, R, E), got {tuple(features.shape)}")
        embeddings = self.embed(captions)                                  # (N, L, E)
        embeddings = torch.cat((features.mean(1, keepdim=True), embeddings), 1)  # (N, 1+L, E)
        # packing drops each caption's last input (its <end>), and gives batch_sizes
        packed = pack_padded_sequence(embeddings, lengths, batch_first=True)
        words, batch_sizes = packed.data, packed.batch_sizes.tolist()      # (sum(lengths), E)
        projected = self.att_regions(features)                             # (N, R, H)
        h, c = self.init_state(features)
        step = cell_step(self.cell)
        hiddens, alphas = [], []
        for x in words.split(batch_sizes):                                 # (bs, E): step t's words
            bs = x.size(0)                              # the captions still running: a prefix
            h, c = h[:bs], c[:bs]
            z, alpha = self.attend(features[:bs], projected[:bs], h)
            h, c = step(torch.cat((x, z), 1), (h, c))                      # (bs, H)
            hiddens.append(h)
            alphas.append(alpha)
        logits = self.linear(self.dropout(torch.cat(hiddens)))            # (sum(lengths), V)
        return (logits, torch.cat(alphas)) if return_alphas else logits

    @staticmethod
    def doubly_stochastic(alphas, lengths, weight=1.0):
        r"""The paper's penalty weight * sum_i (1 - sum_t alpha_ti)^2 (its eq. 14), mean over the N
        captions: each region should get about one unit of attention over the whole caption.

        alphas: (sum(lengths), R) as forward returns them; lengths: list of N ints."""
        batch_sizes = [sum(1 for n in lengths if n > t) for t in range(lengths[0])]
        rows = torch.cat([torch.arange(bs, device=alphas.device) for bs in batch_sizes])  # caption of each row
        totals = alphas.new_zeros(len(lengths), alphas.size(1)).index_add(0, rows, alphas)  # (N, R)
        return weight * (1 - totals).pow(2).sum(1).mean()

    @torch.no_grad()
    def sample(self, features, max_seq_length=None, end_id=2, return_alphas=False):
        """Greedy decoding: (N, R, E) features -> LongTensor (N, T) token ids, and with
        return_alphas=True their weights (N, T, R); T = max_seq_length, by default max_seg_length.

        A caption that has written <end> leaves the batch: its state is not touched again,
        its later tokens are <end> and its later weights 0. Decoding stops when all ended.
        """
        N, T = features.size(0), max_seq_length or self.max_seg_length
        ids = torch.full((N, T), end_id, dtype=torch.long, device=features.device)
        weights = features.new_zeros(N, T, features.size(1))
        projected = self.att_regions(features)                    # (N, R, H)
        h, c = self.init_state(features)
        inputs = features.mean(1)                                 # (N, E) the picture in the word's place
        rows = torch.arange(N, device=features.device)            # which captions are still running
        step = cell_step(self.cell)
        for t in range(T):
            z, alpha = self.attend(features, projected, h)
            h, c = step(torch.cat((inputs, z), 1), (h, c))
            predicted = self.linear(h).argmax(1)                  # (n,)
            ids[rows, t] = predicted
            weights[rows, t] = alpha
            running = predicted != end_id
            if not bool(running.all()):                           # drop the captions that ended
                if not bool(running.any()):
                    break
                keep = running.nonzero().squeeze(1)
                rows, features, projected, h, c, predicted = (
                    x.index_select(0, keep) for x in (rows, features, projected, h, c, predicted))
            inputs = self.embed(predicted)                        # (n, E)
        return (ids, weights) if return_alphas else ids

    # beam search's hooks (CaptionSearch): the state is (h, c, regions, their projection),
    # rows n*K..n*K+K-1 holding image n's hypotheses

    def _search_start(self, features, K):
        features = features.repeat_interleave(K, 0)                # (N*K, R, E)
        h, c = self.init_state(features)
        return features.mean(1), (h, c, features, self.att_regions(features))

    def _search_step(self, inputs, state):
        h, c, features, projected = state
        z, _ = self.attend(features, projected, h)
        h, c = cell_step(self.cell)(torch.cat((inputs, z), 1), (h, c))
        return self.linear(h), (h, c, features, projected)         # (N*K, V)

    def _search_reorder(self, state, parents):
        # a parent is a hypothesis of the same image: the regions stay where they are
        h, c, features, projected = state
        return h.index_select(0, parents), c.index_select(0, parents), features, projected

    def _search_inputs(self, tokens):
        return self.embed(tokens)                                  # (N*K, E)


def cell_step(cell):
    """One step of an LSTM cell as a function (x, (h, c)) -> (h', c').

    For a my_LSTMCell without gradients, autocast or gate logging, that is fused_lstm's
    one-step path (what my_LSTM's greedy decoding runs: the same equations on the same
    parameters, with the four gates' weights multiplied at once); otherwise the cell itself,
    so training's gradients and the gates plot come from the lab's cell as written.
    """
    device = cell.fc_ii.weight.device.type if isinstance(cell, my_LSTMCell) else None
    if (device is None or torch.is_grad_enabled() or cell.gate_log is not None
            or (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))):
        return cell
    w_ih, w_hh, b_ih, b_hh, w_hr = fused_lstm.lstm_weights(cell)
    b = b_ih + b_hh if b_ih is not None else None
    return lambda x, hc: fused_lstm._step(x, hc[0], hc[1], w_ih, w_hh, b, w_hr)
