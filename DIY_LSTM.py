r"""The lab's LSTM, written out: a drop-in for ``nn.LSTM`` built from per-gate ``nn.Linear`` layers.

Read it top to bottom, as PyTorch's benchmarks/fastrnns/custom_lstms.py is built:

    my_LSTMCell   one time step, one gate per line
    lstm_layer    that cell run over a batch of sequences, step by step (packing explained)
    my_LSTM       layers stacked, both directions, h_0/c_0, dropout, projections: what DecoderRNN uses

For input x and previous state (h, c), a step computes (sigma is the sigmoid, * is elementwise)::

    i  = sigma(W_ii x + b_ii + W_hi h + b_hi)      input gate
    f  = sigma(W_if x + b_if + W_hf h + b_hf)      forget gate
    g  = tanh(W_ig x + b_ig + W_hg h + b_hg)       cell candidate (new content)
    o  = sigma(W_io x + b_io + W_ho h + b_ho)      output gate
    c' = f * c + i * g                             memory (cell state)
    h' = o * tanh(c')                              hidden state (h' = W_hr h' with proj_size > 0)

The code uses nn.LSTM's letters; the lab handout writes the same LSTM, without biases, as:

    this file   handout                  parameters: input side, hidden side
    i           g(t), input gate         fc_ii (U^g), fc_hi (W^g)
    f           f(t), forget gate        fc_if (U^f), fc_hf (W^f)
    g           tanh(a(t)), new content  fc_ig (U),   fc_hg (W)
    o           q(t), output gate        fc_io (U^o), fc_ho (W^o)
    c           s(t), memory
    h           h(t), hidden state       fc_hr: the projection (not in the handout)

``my_LSTM(..., fused=True)`` (the default) computes the same layers on the same parameters
with the speed machinery of fused_lstm.py; ``fused=False`` runs this file's cell step by
step, with autograd doing the backward.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

import fused_lstm
import lstm_checks

# nn.LSTM's weight layout, stated once (see "Attributes" in torch/nn/modules/rnn.py):
# weight_ih is (W_ii|W_if|W_ig|W_io) stacked along dim 0, shape (4*H, H_in), weight_hh
# (W_hi|W_hf|W_hg|W_ho) (4*H, H_out), likewise bias_ih and bias_hh (4*H,), and weight_hr is
# W_hr (H_out, H). Gates are always ordered i, f, g, o: concatenating our per-gate
# parameters in this order gives nn.LSTM's tensor, chunking nn.LSTM's gives them back.
LSTM_LAYOUT = {
    'weight_ih': ('fc_ii.weight', 'fc_if.weight', 'fc_ig.weight', 'fc_io.weight'),
    'weight_hh': ('fc_hi.weight', 'fc_hf.weight', 'fc_hg.weight', 'fc_ho.weight'),
    'bias_ih': ('fc_ii.bias', 'fc_if.bias', 'fc_ig.bias', 'fc_io.bias'),
    'bias_hh': ('fc_hi.bias', 'fc_hf.bias', 'fc_hg.bias', 'fc_ho.bias'),
    'weight_hr': ('fc_hr.weight',),
}


class my_LSTMCell(nn.Module):
    r"""One LSTM step (the equations at the top of this file), the counterpart of ``nn.LSTMCell``.

    Args:
        input_size: H_in, the number of features of x
        hidden_size: H, the number of features of c (and of h without projection)
        bias: if False, the gates' Linear layers have no bias. Default: True
        proj_size: if > 0, h' = W_hr (o * tanh(c')) has H_out = proj_size features. Default: 0

    Inputs: input, (h_0, c_0)
        * input: (N, H_in) or (H_in,)
        * h_0: (N, H_out) or (H_out,); c_0: (N, H) or (H,); zeros if (h_0, c_0) is not given

    Outputs: (h_1, c_1)
        * h_1: (N, H_out) or (H_out,); c_1: (N, H) or (H,)

    where: N = batch size, H_in = input_size, H = hidden_size,
        H_out = proj_size if proj_size > 0 else hidden_size

    Attributes:
        fc_ii, fc_if, fc_ig, fc_io: input side, ``nn.Linear(H_in, H, bias)``
        fc_hi, fc_hf, fc_hg, fc_ho: hidden side, ``nn.Linear(H_out, H, bias)``
        fc_hr: the projection ``nn.Linear(H, H_out, bias=False)`` when proj_size > 0, else None
        gate_log: None, or a list to which each forward appends ``dict(i=, f=, g=, o=, c=, h=)``
            of detached (N, .) tensors (N = 1 unbatched). Only the plain path runs the cell.

    The state dict is nn.LSTMCell's (LSTM_LAYOUT's names), so each loads the other's; per-gate
    keys (fc_ii.weight, ...) load too. Every weight and bias starts from nn.LSTM's
    U(-k, k), k = 1/sqrt(hidden_size).

    Examples::

        >>> cell = my_LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 20)))
        >>> h.shape, c.shape
        (torch.Size([3, 20]), torch.Size([3, 20]))
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, proj_size=0):
        super().__init__()
        lstm_checks.check_sizes('my_LSTMCell', input_size, hidden_size, proj_size)
        kw = {'bias': bias, 'device': device, 'dtype': dtype}
        self.input_size, self.hidden_size, self.bias, self.proj_size = input_size, hidden_size, bias, proj_size
        h_out = proj_size if proj_size > 0 else hidden_size
        # input side: x(t) -> each gate's pre-activation
        self.fc_ii = nn.Linear(input_size, hidden_size, **kw)
        self.fc_if = nn.Linear(input_size, hidden_size, **kw)
        self.fc_ig = nn.Linear(input_size, hidden_size, **kw)
        self.fc_io = nn.Linear(input_size, hidden_size, **kw)
        # hidden side: h(t-1) -> each gate's pre-activation
        self.fc_hi = nn.Linear(h_out, hidden_size, **kw)
        self.fc_hf = nn.Linear(h_out, hidden_size, **kw)
        self.fc_hg = nn.Linear(h_out, hidden_size, **kw)
        self.fc_ho = nn.Linear(h_out, hidden_size, **kw)
        self.fc_hr = nn.Linear(hidden_size, proj_size, bias=False, device=device, dtype=dtype) if proj_size > 0 else None
        self.gate_log = None
        self.register_state_dict_post_hook(_save_in_lstm_layout)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.LSTM's initialisation, not nn.Linear's (which scales by fan-in)
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def forward(self, input, hx=None):
        batched = input.dim() == 2
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        lstm_checks.check_cell_input(input, hx, self.input_size, h_out, self.hidden_size)
        x = input if batched else input.unsqueeze(0)                        # (N, H_in)
        if hx is None:
            h = x.new_zeros(x.size(0), h_out)                               # (N, H_out)
            c = x.new_zeros(x.size(0), self.hidden_size)                    # (N, H)
        else:
            h, c = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        i = torch.sigmoid(self.fc_ii(x) + self.fc_hi(h))    # input gate       (N, H)
        f = torch.sigmoid(self.fc_if(x) + self.fc_hf(h))    # forget gate
        g = torch.tanh(self.fc_ig(x) + self.fc_hg(h))       # cell candidate
        o = torch.sigmoid(self.fc_io(x) + self.fc_ho(h))    # output gate
        c = f * c + i * g                                   # memory: keep part of the old, add part of the new
        h = o * torch.tanh(c)                               # hidden state
        if self.fc_hr is not None:
            h = self.fc_hr(h)                               # projection       (N, H_out)
        if self.gate_log is not None:
            self.gate_log.append({k: t.detach() for k, t in dict(i=i, f=f, g=g, o=o, c=c, h=h).items()})
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    def lstm_layout(self):
        """Yield (nn.LSTM name, [our per-gate parameters in i, f, g, o order]) for the names this cell has."""
        for name, parts in LSTM_LAYOUT.items():
            owners = (p.partition('.') for p in parts)                     # ('fc_ii', '.', 'weight'), ...
            # None where the cell has no such tensor (bias=False, no projection)
            tensors = [getattr(self._modules.get(owner), attr, None) for owner, _, attr in owners]
            if tensors[0] is not None:
                yield name, tensors

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.LSTMCell's 'weight_ih' (4*H, H_in) becomes 'fc_ii.weight' ... 'fc_io.weight' (H, H_in)
        for name, parts in LSTM_LAYOUT.items():
            value = state_dict.pop(prefix + name, None)
            if value is not None:
                for part, chunk in zip(parts, value.chunk(len(parts))):
                    state_dict[prefix + part] = chunk
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        s = f'{self.input_size}, {self.hidden_size}' + ('' if self.bias else ', bias=False')
        return s + (f', proj_size={self.proj_size}' if self.proj_size else '')


def _save_in_lstm_layout(cell, state_dict, prefix, local_metadata):
    """my_LSTMCell's state_dict hook: the per-gate keys become nn.LSTMCell's (where all are
    there: a parametrized gate, e.g. weight_norm, keeps its own keys)."""
    for name, parts in LSTM_LAYOUT.items():
        keys = [prefix + p for p in parts]
        if all(k in state_dict for k in keys):
            with torch.no_grad():
                state_dict[prefix + name] = torch.cat([state_dict.pop(k) for k in keys])


def lstm_layer(cell, x, batch_sizes, h0=None, c0=None):
    """Run one cell over a batch of sequences, forward in time, one step at a time.

    The sequences come packed, time-major, the layout of ``PackedSequence.data`` (a dense
    batch is a packed one whose batch_sizes are all N). The batch is sorted longest first,
    so step t's rows are the first batch_sizes[t] sequences, and the active batch only shrinks:

        batch_sizes = [3, 3, 2, 1]        rows of x (T = 9)
        seq 0: x00 x01 x02 x03            t=0: x00 x10 x20
        seq 1: x10 x11 x12                t=1: x01 x11 x21
        seq 2: x20 x21                    t=2: x02 x12
                                          t=3: x03

    h[:batch_sizes[t]] is the previous state of exactly the sequences still running; those
    dropped when the batch shrinks have just taken their last step, so their (h, c) is final.

    Args: cell (a my_LSTMCell); x (T, H_in), packed rows; batch_sizes: list of ints,
        non-increasing, summing to T; h0 (N, H_out), c0 (N, H), N = batch_sizes[0], None for zeros
    Returns: out (T, H_out), and h_n (N, H_out), c_n (N, H): each sequence's state after its last step
    """
    N, h_out = batch_sizes[0], cell.proj_size or cell.hidden_size
    h = h0 if h0 is not None else x.new_zeros(N, h_out)                  # (N, H_out)
    c = c0 if c0 is not None else x.new_zeros(N, cell.hidden_size)       # (N, H)
    outputs, h_n, c_n = [], [], []
    for x_t in x.split(batch_sizes):                                     # (bs, H_in): step t's rows
        bs = x_t.size(0)
        if bs < h.size(0):                          # sequences bs.. ended with the previous step
            h_n.append(h[bs:])
            c_n.append(c[bs:])
            h, c = h[:bs], c[:bs]
        h, c = cell(x_t, (h, c))
        outputs.append(h)
    h_n.append(h)
    c_n.append(c)
    # the longest sequences ended last: reversed, the final states are in batch order
    return torch.cat(outputs), torch.cat(h_n[::-1]), torch.cat(c_n[::-1])


def _reversed_rows(batch_sizes, device):
    """LongTensor (T,): the permutation of packed rows that reverses every sequence in time.

    Row (t, b) of a sequence of length L_b goes to row (L_b - 1 - t, b); the permutation
    is its own inverse, so it also maps the reverse direction's output back.
    """
    bs = torch.tensor(batch_sizes)                                       # (L,)
    starts = torch.cumsum(bs, 0) - bs                                    # (L,) first row of each step
    lengths = (bs.unsqueeze(0) > torch.arange(batch_sizes[0]).unsqueeze(1)).sum(1)  # (N,)
    t = torch.repeat_interleave(torch.arange(len(batch_sizes)), bs)      # (T,) step of each row
    b = torch.arange(int(bs.sum())) - starts[t]                          # (T,) sequence of each row
    return (starts[lengths[b] - 1 - t] + b).to(device)


class my_LSTM(nn.Module):
    r"""A multi-layer LSTM, a drop-in for ``nn.LSTM``: same arguments, inputs, outputs, errors and state dict.

    Each layer runs a my_LSTMCell over the sequence (lstm_layer); layer k > 0 reads layer
    k-1's h, after dropout in training mode when dropout > 0.

    Args:
        input_size: H_in, the number of features of x
        hidden_size: H, the number of features of c (and of h without projection)
        num_layers: number of stacked layers. Default: 1
        bias: if False, no biases b_ih and b_hh. Default: True
        batch_first: if True, input and output are (N, L, .) instead of (L, N, .);
            h_n and c_n are not affected. Default: False
        dropout: probability of zeroing each layer's output but the last, in training. Default: 0
        bidirectional: if True, each layer also runs backward in time. Default: False
        proj_size: if > 0, project h to proj_size features. Default: 0
        fused: if True, layers run on fused_lstm.py (same parameters, same results, faster; no
            gradients of gradients); if False, on lstm_layer and my_LSTMCell with autograd.
            An attribute too: ``lstm.fused = False``. Default: True

    Inputs: input, (h_0, c_0)
        * input: (L, H_in) unbatched, (L, N, H_in), (N, L, H_in) if batch_first=True, or a
          PackedSequence (``pack_padded_sequence``/``pack_sequence``, sorted or not)
        * h_0: (D * num_layers, N, H_out), or (D * num_layers, H_out) unbatched; zeros if not given
        * c_0: (D * num_layers, N, H), or (D * num_layers, H) unbatched; zeros if not given

    Outputs: output, (h_n, c_n)
        * output: (L, N, D * H_out), (N, L, D * H_out) if batch_first=True, (L, D * H_out)
          unbatched, or a PackedSequence like the input's
        * h_n: (D * num_layers, N, H_out), each sequence's state after its own last step, in
          the caller's batch order; for D = 2, 2k is layer k's forward direction, 2k + 1 its reverse
        * c_n: (D * num_layers, N, H), likewise (both without N for unbatched input)

    where: N = batch size, L = sequence length, D = 2 if bidirectional else 1,
        H_in = input_size, H = hidden_size, H_out = proj_size if proj_size > 0 else hidden_size

    Attributes:
        cells: ``nn.ModuleDict`` of my_LSTMCell named like nn.LSTM's weight suffixes:
            'l0', 'l0_reverse', 'l1', ... (``cells.l0.fc_ii.weight`` is W_ii of layer 0)

    The state dict has nn.LSTM's keys (weight_ih_l0, ...), so nn.LSTM loads ours and we load
    nn.LSTM's, also inside a model (the tutorial's decoder-5-3000.pkl); per-gate keys load too.

    What nn.LSTM has and my_LSTM cannot, by design: its flat Parameters (``weight_hh_l0``, ...),
    which ``nn.utils.parametrizations.weight_norm(lstm, 'weight_hh_l0')`` and init recipes such
    as ``nn.init.orthogonal_(lstm.weight_hh_l0)`` take by name. Here each gate is its own
    Parameter: ``weight_norm(m.cells.l0.fc_hi)``, ``nn.init.orthogonal_(m.cells.l0.fc_hi.weight)``,
    and so on for fc_hf, fc_hg, fc_ho (the hook-based ``nn.utils.weight_norm``: plain path only).

    Examples::

        >>> rnn = my_LSTM(10, 20, 2)
        >>> input, h0, c0 = torch.randn(5, 3, 10), torch.randn(2, 3, 20), torch.randn(2, 3, 20)
        >>> output, (hn, cn) = rnn(input, (h0, c0))
        >>> output.shape, hn.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
        >>> torch.allclose(rnn.to_lstm()(input, (h0, c0))[0], output, atol=1e-6)
        True
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, fused=True):
        super().__init__()
        lstm_checks.check_lstm_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.fused = bidirectional, proj_size, fused
        D = 2 if bidirectional else 1
        h_out = proj_size if proj_size > 0 else hidden_size
        self.cells = nn.ModuleDict()
        for layer in range(num_layers):
            for suffix in ('', '_reverse')[:D]:
                self.cells[f'l{layer}{suffix}'] = my_LSTMCell(input_size if layer == 0 else h_out * D, hidden_size,
                                                              bias, device, dtype, proj_size=proj_size)
        self.register_state_dict_post_hook(_save_with_lstm_keys)
        self.flatten_parameters()

    def reset_parameters(self):
        for cell in self.cells.values():
            cell.reset_parameters()

    def flatten_parameters(self):
        """Make each cell's parameters views into one buffer in nn.LSTM's layout (as nn.LSTM's
        flatten_parameters does), for the fused path; a parameter moved out (``.to()``,
        ``p.data = ...``) goes back at the next fused forward."""
        for cell in self.cells.values():
            fused_lstm.flatten(cell)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() give the parameters new memory: flatten them there now, as
        # nn.LSTM does, before anyone (an optimizer, DDP) holds on to them
        super()._apply(fn, recurse)
        self.flatten_parameters()
        return self

    def forward(self, input, hx=None):
        D = 2 if self.bidirectional else 1
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        # 1. everything becomes packed time-major rows x (T, H_in) with batch_sizes (see lstm_layer)
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes_t, sorted_indices, unsorted_indices = input
            batch_sizes, batched = batch_sizes_t.tolist(), True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"my_LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            seq = input if batched else input.unsqueeze(1)                    # (L, N, H_in) or (N, L, H_in)
            if batched and self.batch_first:
                seq = seq.transpose(0, 1)                                     # (L, N, H_in)
            L, N = seq.shape[:2]
            x, batch_sizes = seq.reshape(L * N, seq.size(2)), [N] * L         # (T, H_in), T = L * N
        autocast = lstm_checks.check_lstm_input(self, x, packed, batch_sizes)
        N = batch_sizes[0]
        # 2. initial states (D * num_layers, N, .), in the packed (sorted) batch order; None: zeros
        h0 = c0 = [None] * (self.num_layers * D)
        if hx is not None:
            h0, c0 = lstm_checks.check_hidden(self, hx, batched, N, h_out)
            if packed and sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        if autocast:  # as autocast runs nn.LSTM: input and states in the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            h0, c0 = ([s if s is None else s.to(dtype) for s in states] for states in (h0, c0))
        # 3. the stack: layer by layer, each direction with its own cell
        layer_fn = fused_lstm.lstm_layer if self.fused else lstm_layer
        reverse = _reversed_rows(batch_sizes, x.device) if D == 2 else None
        cells = list(self.cells.values())                                     # l0, l0_reverse, l1, ...
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d in range(D):
                k = layer * D + d
                x_d = x if d == 0 else x.index_select(0, reverse)            # every sequence reversed in time
                out, h, c = layer_fn(cells[k], x_d, batch_sizes, h0[k], c0[k])
                outputs.append(out if d == 0 else out.index_select(0, reverse))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, 1) if D == 2 else outputs[0]              # (T, D * H_out)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)                        # (D * num_layers, N, .)
        # 4. back to the caller's layout
        if packed:
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
            return PackedSequence(x, batch_sizes_t, sorted_indices, unsorted_indices), (h_n, c_n)
        output = x.view(L, N, x.size(1))                                     # (L, N, D * H_out)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (output.transpose(0, 1) if self.batch_first else output), (h_n, c_n)

    # --- weight exchange with nn.LSTM (the layout is LSTM_LAYOUT, at the top) ---

    @classmethod
    def from_lstm(cls, lstm, fused=True):
        """A my_LSTM with lstm's configuration, device, dtype, mode and (copied) weights."""
        return _copy(lstm, cls, fused=fused)

    def to_lstm(self):
        """An nn.LSTM with this module's configuration, device, dtype, mode and (copied) weights."""
        return _copy(self, nn.LSTM)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.LSTM's 'weight_ih_l0' becomes 'cells.l0.weight_ih', which the cell then splits into its
        # gates. This runs with the full prefix (e.g. 'lstm.') before the cells read their keys, so
        # a decoder with nn.LSTM's keys loads strictly too.
        for suffix in self.cells:
            for name in LSTM_LAYOUT:
                value = state_dict.pop(f'{prefix}{name}_{suffix}', None)
                if value is not None:
                    state_dict[f'{prefix}cells.{suffix}.{name}'] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                        fused=True)
        s = f'{self.input_size}, {self.hidden_size}'
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f', {name}={getattr(self, name)}'
        return s


def _copy(lstm, cls, **kwargs):
    w = next(lstm.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the original already warned about dropout with one layer
        new = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first, lstm.dropout,
                  lstm.bidirectional, lstm.proj_size, device=w.device, dtype=w.dtype, **kwargs)
    new.load_state_dict(lstm.state_dict())
    return new.train(lstm.training)


def _save_with_lstm_keys(lstm, state_dict, prefix, local_metadata):
    """my_LSTM's state_dict hook: 'cells.l0.weight_ih' (from the cell's hook) becomes 'weight_ih_l0'."""
    for suffix in lstm.cells:
        for name in LSTM_LAYOUT:
            value = state_dict.pop(f'{prefix}cells.{suffix}.{name}', None)
            if value is not None:
                state_dict[f'{prefix}{name}_{suffix}'] = value
