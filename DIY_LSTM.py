r"""A hand-written LSTM: a drop-in for ``nn.LSTM`` built from per-gate ``nn.Linear`` layers.

Built as cell -> layer -> stack, like PyTorch's benchmarks/fastrnns/custom_lstms.py:

    my_LSTMCell   one time step, one gate per line (the version to read first)
    lstm_layer    one cell run over a whole sequence in one direction (the fast path)
    my_LSTM       layers stacked, bidirectional, packed sequences (what DecoderRNN uses)

The equations, in the lab handout's notation and in nn.LSTM's (biases b_i* and b_h*
are left out of the handout; nn.LSTM has both, and so does every nn.Linear here)::

    handout                                     nn.LSTM / this file
    g(t) = sigmoid(U^g x(t) + W^g h(t-1))       i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)   input gate
    f(t) = sigmoid(U^f x(t) + W^f h(t-1))       f = sigmoid(W_if x + b_if + W_hf h + b_hf)   forget gate
    a(t) = U x(t) + W h(t-1)                    g = tanh(W_ig x + b_ig + W_hg h + b_hg)      cell candidate = tanh(a)
    q(t) = sigmoid(U^o x(t) + W^o h(t-1))       o = sigmoid(W_io x + b_io + W_ho h + b_ho)   output gate
    s(t) = f(t) * s(t-1) + g(t) * tanh(a(t))    c' = f * c + i * g                           memory / cell state
    h(t) = q(t) * tanh(s(t))                    h' = o * tanh(c')                            hidden state
                                                h' = W_hr (o * tanh(c'))  when proj_size > 0

Example: python -m pytest tests/test_diy_lstm.py -q   (checks it against nn.LSTM)
"""
import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

# nn.LSTM's weight layout, stated once (see "Attributes" in torch/nn/modules/rnn.py):
# weight_ih_l[k] is (W_ii|W_if|W_ig|W_io) stacked along dim 0, shape (4*H, H_in),
# weight_hh_l[k] is (W_hi|W_hf|W_hg|W_ho), shape (4*H, H_out), likewise bias_ih_l[k] and
# bias_hh_l[k] (4*H,), and weight_hr_l[k] is W_hr, shape (H_out, H). The gates are
# always ordered i, f, g, o. Each name maps to our per-gate parameters in that order;
# concatenating them gives nn.LSTM's tensor, chunking nn.LSTM's tensor gives them back.
# Everything that converts (lstm_weights, load_lstm_weights, from_lstm, to_lstm, the
# state-dict keys) and the fused fast path go through this one table.
LSTM_LAYOUT = {
    'weight_ih': ('fc_ii.weight', 'fc_if.weight', 'fc_ig.weight', 'fc_io.weight'),
    'weight_hh': ('fc_hi.weight', 'fc_hf.weight', 'fc_hg.weight', 'fc_ho.weight'),
    'bias_ih': ('fc_ii.bias', 'fc_if.bias', 'fc_ig.bias', 'fc_io.bias'),
    'bias_hh': ('fc_hi.bias', 'fc_hf.bias', 'fc_hg.bias', 'fc_ho.bias'),
    'weight_hr': ('fc_hr.weight',),
}


class my_LSTMCell(nn.Module):
    r"""One LSTM step, the counterpart of ``nn.LSTMCell``, with one ``nn.Linear`` per gate and side.

    .. math::
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}),\quad
        f = \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}),\quad
        g = \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}),\quad
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}),\quad
        c' = f \odot c + i \odot g,\quad h' = o \odot \tanh(c')

    Args:
        input_size: H_in, the number of features of x
        hidden_size: H, the number of features of c (and of h without projection)
        bias: if False, the gates' Linear layers have no bias. Default: True
        proj_size: if > 0, h' = W_hr (o * tanh(c')) has H_out = proj_size features
            (nn.LSTM's projection; nn.LSTMCell has none). Default: 0

    Inputs: input, (h_0, c_0)
        * input: (N, H_in) or (H_in,)
        * h_0: (N, H_out) or (H_out,); zeros if (h_0, c_0) is not given
        * c_0: (N, H) or (H,); zeros if not given

    Outputs: (h_1, c_1)
        * h_1: (N, H_out) or (H_out,)
        * c_1: (N, H) or (H,)

    where: N = batch size, H_in = input_size, H = hidden_size,
        H_out = proj_size if proj_size > 0 else hidden_size

    Attributes:
        fc_ii, fc_if, fc_ig, fc_io: input side, ``nn.Linear(H_in, H, bias)``
            (the handout's U^g, U^f, U, U^o; nn.LSTM's W_ii|b_ii, W_if|b_if, W_ig|b_ig, W_io|b_io)
        fc_hi, fc_hf, fc_hg, fc_ho: hidden side, ``nn.Linear(H_out, H, bias)``
            (the handout's W^g, W^f, W, W^o; nn.LSTM's W_hi|b_hi ... W_ho|b_ho)
        fc_hr: the projection ``nn.Linear(H, H_out, bias=False)`` when proj_size > 0, else None

    .. note:: As in nn.LSTM, every weight and bias starts from U(-k, k) with k = 1/sqrt(hidden_size).

    Examples::

        >>> cell = my_LSTMCell(10, 20)
        >>> x, h, c = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
        >>> h, c = cell(x, (h, c))
        >>> h.shape, c.shape
        (torch.Size([3, 20]), torch.Size([3, 20]))
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, proj_size=0):
        super().__init__()
        _check_sizes('my_LSTMCell', input_size, hidden_size, proj_size)
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
        self._fused_cache = None  # see fused_weights()
        self.reset_parameters()

    def reset_parameters(self):
        # nn.LSTM's initialisation, not nn.Linear's (which scales by fan-in)
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"my_LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)                        # (N, H_in)
        if x.size(1) != self.input_size:
            raise RuntimeError(f"my_LSTMCell: input has inconsistent input_size: got {x.size(1)}, "
                               f"expected {self.input_size}")
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h = x.new_zeros(x.size(0), h_out)                               # (N, H_out)
            c = x.new_zeros(x.size(0), self.hidden_size)                    # (N, H)
        else:
            h, c = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
            for k, (state, size) in enumerate(((h, h_out), (c, self.hidden_size))):
                if tuple(state.shape) != (x.size(0), size):
                    raise RuntimeError(f"my_LSTMCell: Expected hx[{k}] of shape {tuple(input.shape[:-1]) + (size,)}, "
                                       f"got {list(hx[k].shape)}")
        # One line per gate. Handout: g, f, a, q; nn.LSTM: i, f, g, o.
        i = torch.sigmoid(self.fc_ii(x) + self.fc_hi(h))   # input gate     g(t) = sigmoid(U^g x + W^g h)
        f = torch.sigmoid(self.fc_if(x) + self.fc_hf(h))   # forget gate    f(t) = sigmoid(U^f x + W^f h)
        g = torch.tanh(self.fc_ig(x) + self.fc_hg(h))      # new content    tanh(a(t)), a(t) = U x + W h
        o = torch.sigmoid(self.fc_io(x) + self.fc_ho(h))   # output gate    q(t) = sigmoid(U^o x + W^o h)
        c = f * c + i * g                                  # memory         s(t) = f(t) * s(t-1) + g(t) * tanh(a(t))
        h = o * torch.tanh(c)                              # hidden         h(t) = q(t) * tanh(s(t))
        if self.fc_hr is not None:
            h = self.fc_hr(h)                              # projection     h(t) = W_hr h(t)   (N, H_out)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    # --- conversion to and from nn.LSTM's layout (LSTM_LAYOUT above) ---

    def lstm_layout(self):
        """Yield (nn.LSTM name, [our per-gate parameters in i, f, g, o order]) for the names this cell has."""
        for name, parts in LSTM_LAYOUT.items():
            tensors = [_get(self, p) for p in parts if _get(self, p) is not None]
            if tensors:
                yield name, tensors

    def lstm_weights(self):
        """This cell's parameters in nn.LSTM's layout, concatenated now (and differentiable).

        Returns a dict with 'weight_ih' (4*H, H_in), 'weight_hh' (4*H, H_out), and when
        present 'bias_ih' (4*H,), 'bias_hh' (4*H,), 'weight_hr' (H_out, H).
        """
        return {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in self.lstm_layout()}

    @torch.no_grad()
    def load_lstm_weights(self, weights):
        """Copy in a dict of nn.LSTM-layout tensors (the inverse of lstm_weights)."""
        for name, ts in self.lstm_layout():
            for p, w in zip(ts, weights[name].chunk(len(ts))):
                p.copy_(w)

    def fused_weights(self, joint=False):
        """(W_ih (4*H, H_in), W_hh (4*H, H_out), b (4*H,) or None, W_hr (H_out, H) or None) for lstm_layer.

        nn.LSTM's layout, concatenated at call time so that gradients flow back into the
        per-gate Linear layers, with two changes for speed: b = b_ih + b_hh (both get the
        same gradient, as in nn.LSTM), and the cell candidate's rows are doubled, because
        tanh(x) = 2 sigmoid(2x) - 1 lets one sigmoid call cover all four gates.

        When no autograd graph is needed (no_grad, or frozen weights) the result is reused
        while every parameter is the same tensor, at the same address, with the same version
        counter (which every in-place update bumps: optimizer steps, load_state_dict,
        nn.init). That matters for greedy decoding, which makes one tiny call per token:
        at batch 1, copying the 4*H*(H_in+H_out) weights costs about as much as the step.
        XXX: writes through ``p.data`` bypass the version counter; call ``clear_cache()``
        after them (https://pytorch.org/docs/stable/notes/autograd.html#in-place-correctness-checks).

        With joint=True it returns (that tuple, [W_ih | W_hh] of shape (4*H, H_in + H_out)),
        the latter only from the cache (else None): one matmul on [x | h] is ~20% faster than
        two at batch 1.
        """
        # the parameters straight from the gate layers: self.parameters() costs more than
        # a whole batch-1 step's element-wise work
        params = [p for m in self._modules.values() if m is not None for p in m._parameters.values() if p is not None]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return (self._fuse(), None) if joint else self._fuse()
        # ids are safe to compare: the cache holds the parameters, so no id gets reused
        key = [(id(p), p._version, p.data_ptr()) for p in params]
        cache = self._fused_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                self._fused_cache = cache = [key, params, self._fuse(), None]
        if not joint:
            return cache[2]
        if cache[3] is None:
            cache[3] = torch.cat(cache[2][:2], 1)
        return cache[2], cache[3]

    def _fuse(self):
        def stack(name):  # like lstm_weights()[name], with gate g (the third) doubled
            return torch.cat([2 * p if k == 2 else p for k, p in enumerate(dict(self.lstm_layout())[name])])
        b = stack('bias_ih') + stack('bias_hh') if self.bias else None
        return stack('weight_ih'), stack('weight_hh'), b, self.fc_hr.weight if self.fc_hr is not None else None

    def clear_cache(self):
        self._fused_cache = None

    def __getstate__(self):
        # torch.save(module) and deepcopy: the cache is derived data, never saved
        state = super().__getstate__() if hasattr(super(), '__getstate__') else self.__dict__
        state = dict(state)
        state['_fused_cache'] = None
        return state

    def extra_repr(self):
        s = f'{self.input_size}, {self.hidden_size}'
        s += '' if self.bias else ', bias=False'
        return s + (f', proj_size={self.proj_size}' if self.proj_size else '')


def _get(module, dotted):
    """module.fc_ii.bias for 'fc_ii.bias'; None where it does not exist (bias=False, no projection)."""
    owner, _, name = dotted.partition('.')
    sub = getattr(module, owner, None)
    return getattr(sub, name, None) if sub is not None else None


def _check_sizes(cls, input_size, hidden_size, proj_size):
    for name, value in (('input_size', input_size), ('hidden_size', hidden_size), ('proj_size', proj_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{cls}: {name} should be of type int, got: {type(value).__name__}")
    if input_size <= 0 or hidden_size <= 0:
        raise ValueError(f"{cls}: input_size and hidden_size must be greater than zero, "
                         f"got input_size={input_size}, hidden_size={hidden_size}")
    if proj_size < 0:
        raise ValueError(f"{cls}: proj_size should be a positive integer or zero to disable projections, got {proj_size}")
    if proj_size >= hidden_size:
        raise ValueError(f"{cls}: proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                         f"and hidden_size={hidden_size}")


# --------------------------------------------------------------------------------------
# The layer: one cell over a whole sequence. This is where the speed comes from.
#
# Sequences live as "packed" time-major rows, the layout of PackedSequence.data, for dense
# input too (a dense batch is a packed one whose batch_sizes are all N). With the batch
# sorted longest first, step t's rows are the first batch_sizes[t] sequences:
#
#     batch_sizes = [3, 3, 2, 1]        rows of x (T = 9)
#     seq 0: x00 x01 x02 x03            t=0: x00 x10 x20
#     seq 1: x10 x11 x12                t=1: x01 x11 x21
#     seq 2: x20 x21                    t=2: x02 x12
#                                       t=3: x03
#
# so the active batch only shrinks, and h(t-1)[:batch_sizes[t]] is the previous state of
# exactly the sequences still running. Per layer and direction the work is:
#   1. one matmul for the input side of every step: (T, H_in) @ W_ih^T -> (T, 4H);
#   2. per step one matmul for the hidden side (on W_hh packed once for the GEMM kernel,
#      see _step_matmul), added in place, and the gate equations (_cell) written straight
#      into preallocated (T, .) buffers, with no autograd bookkeeping;
#   3. a hand-written backward (backpropagation through time) that again does one matmul
#      per step, and gets dW_ih, dW_hh and dx from one big matmul each over all steps,
#      where autograd would do small ones step by step.
# Without a given hx, h(-1) = 0 and the first step's hidden-side matmul is skipped. One
# step from a given state without autograd (greedy decoding) takes a shorter path, _step.
# --------------------------------------------------------------------------------------

# --- the layer's matmuls -----------------------------------------------------------------
# XXX: on the CPU, which library multiplies the float32 matrices matters as much as anything
# else in this file. PyTorch's matmuls call MKL; nn.LSTM's CPU kernel calls oneDNN. MKL is
# Intel's: on a 2-core Xeon (AVX512) it is as fast as oneDNN or faster at the LSTM's shapes,
# and its packed GEMM (_step_matmul) beats both for the per-step product. On AMD CPUs MKL
# takes slower code paths: on an AMD EPYC (AVX512) oneDNN's matmul measured 1.1x to 2.4x
# faster at batch 1 to 128. So CPU_MATMUL = 'auto' calls oneDNN on AMD CPUs and MKL (through
# torch.mm) elsewhere; 'mkl' or 'onednn' forces one (bench/bench_lstm.py --cpu_matmul).
# Either gives float32 results to rounding; GPUs always use torch.mm (cuBLAS).
CPU_MATMUL = 'auto'

# oneDNN's linear layer and MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute): the
# ops torch.compile's CPU backend calls for nn.Linear; None in builds without them
_ONEDNN_LINEAR = getattr(getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise', None), 'default', None)
try:
    _MKL_PACK, _MKL_LINEAR = torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
except (AttributeError, RuntimeError):
    _MKL_PACK = _MKL_LINEAR = None


def _cpu_vendor():
    """'GenuineIntel', 'AuthenticAMD', ... as /proc/cpuinfo says; '' where it cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('vendor_id')), '')
    except OSError:
        return ''


_CPU_VENDOR = _cpu_vendor()


def cpu_matmul(t):
    """The library the layer multiplies tensors like t with: 'onednn', 'mkl' or 'torch'."""
    if t.device.type != 'cpu' or t.dtype != torch.float32:
        return 'torch'
    if CPU_MATMUL not in ('auto', 'mkl', 'onednn'):
        raise ValueError(f"DIY_LSTM: CPU_MATMUL must be 'auto', 'mkl' or 'onednn', got {CPU_MATMUL!r}")
    onednn = CPU_MATMUL == 'onednn' or (CPU_MATMUL == 'auto' and _CPU_VENDOR == 'AuthenticAMD')
    if onednn and _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return 'onednn'
    return 'mkl' if torch.backends.mkl.is_available() else 'torch'


def _matmuls(lib):
    """The layer's matmuls on library lib (from cpu_matmul), as (linear, addmm_, wgrad):
        linear(x, w, b=None) = x @ w^T + b      (F.linear; w may be a transposed view)
        addmm_(out, x, w):      out += x @ w^T, in place
        wgrad(d, x)           = d^T @ x         (a weight gradient: d (T, out), x (T, in))
    None of them records an autograd graph (oneDNN's op has no backward): the layer only
    calls them inside its own autograd Function, or without a graph.
    """
    if lib == 'onednn':
        return _onednn_linear, _onednn_addmm_, _onednn_wgrad
    return _linear, _addmm_, _wgrad


def _linear(x, w, b=None):
    return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())


def _addmm_(out, x, w):
    return out.addmm_(x, w.t())


def _wgrad(d, x):
    return torch.mm(d.t(), x)


def _onednn_linear(x, w, b=None):
    return _ONEDNN_LINEAR(x, w, b, 'none', [], '')


def _onednn_addmm_(out, x, w):
    return out.add_(_onednn_linear(x, w))


def _onednn_wgrad(d, x):
    return _onednn_linear(x.t().contiguous(), d.t()).t()    # as (x^T d)^T: the layout oneDNN is fastest at


def _step_matmul(w, n, uses, lib, addmm_):
    """step_(out, x): out += x @ w^T, in place, for the forward's per-step matmul on library lib
    (from cpu_matmul), falling back to addmm_ (from _matmuls).

    Every step multiplies by the same w (4H, H_out), so on MKL it is worth doing what
    oneDNN's RNN (nn.LSTM's CPU kernel) does: reorder w once into the GEMM kernel's own
    blocked layout, instead of letting every step's sgemm repack it. On a 2-core Xeon (AVX512)
    that takes ~6% off the 22 (128, 512) x (512, 2048) steps of bench case (b), packing
    included. MKL's packed layout is made for one row count n, so only steps with n rows use
    it (all of a dense batch, the first steps of a packed one); packing costs about one
    step, hence `uses`. The backward's da W_hh is left to addmm_: it would need W_hh^T
    packed, and transposing W_hh costs more than packing saves (measured).
    """
    if _MKL_PACK is not None and uses >= 4 and lib == 'mkl':
        packed = _MKL_PACK(w, n)

        def step_(out, x):
            if x.size(0) != n:
                return addmm_(out, x, w)
            return out.add_(_MKL_LINEAR(x, packed, w, None, n))
        return step_
    return lambda out, x: addmm_(out, x, w)


def _cell(a, c, c_out=None, r_out=None, h_out=None, m_out=None, w_hr=None, linear=_linear):
    """The gates of one step, from its pre-activations: the equations of my_LSTMCell.forward.

    a: (N, 4H) pre-activations x W_ih^T + b + h W_hh^T, with the cell candidate's doubled
    (see fused_weights); overwritten by the gates i, f, s, o, where g = 2s - 1.
    c: (N, H) the previous memory, None for zeros. The *_out buffers, when given, receive
    c' (N, H), r = sigmoid(-2c') (N, H), h' (N, H_out) and, with a projection, o * tanh(c')
    (multiplied by w_hr with `linear`, see _matmuls). Returns (h', c').
    """
    # XXX: torch.tanh is avoided on purpose. On CPU it runs through MKL's VML, which on AMD
    # EPYC was 5x slower than torch.sigmoid and, at 2 threads on a busy machine, could wait a
    # whole scheduler tick (~20 ms) for a 512-element tensor. tanh(x) = 2 sigmoid(2x) - 1 =
    # 1 - 2 sigmoid(-2x), so one sigmoid call covers all four gates, and another tanh(c').
    i, f, s, o = a.sigmoid_().chunk(4, 1)            # input, forget, s = (g + 1) / 2, output; each (N, H)
    if c is not None:
        c = torch.mul(f, c, out=c_out).addcmul_(i, s, value=2).sub_(i)     # c' = f*c + i*(2s-1) = f*c + i*g
    else:
        c = torch.mul(i, s, out=c_out).mul_(2).sub_(i)                     # c' = i*g when c = 0
    r = torch.mul(c, -2, out=r_out).sigmoid_()       # tanh(c') = 1 - 2r
    if w_hr is None:
        h = torch.addcmul(o, o, r, value=-2, out=h_out)                    # h' = o*tanh(c') = o - 2*o*r
    else:
        m = torch.addcmul(o, o, r, value=-2, out=m_out)                    # o*tanh(c')
        h = linear(m, w_hr)                                                # h' = W_hr (o*tanh(c'))
        h = h_out.copy_(h) if h_out is not None else h
    return h, c


def _step(x, h, c, w_joint, b, w_hr):
    """One step from a given state, without autograd (greedy decoding): returns (h', c').

    x (N, H_in), h (N, H_out), c (N, H); w_joint = [W_ih | W_hh] (4H, H_in + H_out) takes
    both sides in one matmul, ~20% faster than two at batch 1.
    """
    linear = _matmuls(cpu_matmul(x))[0]
    a = linear(torch.cat([x, h], 1), w_joint, b)                           # (N, 4H), from [x | h] (N, H_in + H_out)
    return _cell(a, c, w_hr=w_hr, linear=linear)


def _recurrence(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes):
    """Forward of one layer in one direction; returns hs (T, H_out) and what the backward needs.

    h0 None means zeros. As in fused_weights, the cell candidate's rows of w_ih, b and
    w_hh are doubled, and g = 2 sigmoid(.) - 1.
    """
    T, H = x.size(0), w_hh.size(0) // 4
    # (T, 4H) the input side of every step; the loop adds the hidden side in place, and
    # then holds the gates i, f, s, o with g = 2s - 1
    lib = cpu_matmul(x)
    linear, addmm_, _ = _matmuls(lib)
    acts = linear(x, w_ih, b)
    cs = x.new_empty(T, H)                           # (T, H) memory c(t)
    rs = x.new_empty(T, H)                           # (T, H) r = sigmoid(-2c), tanh(c) = 1 - 2r
    hs = x.new_empty(T, w_hh.size(1))                # (T, H_out) outputs h(t)
    ms = x.new_empty(T, H) if w_hr is not None else None  # (T, H) o * tanh(c) before the projection
    h, c = h0, c0
    full = sum(bs == batch_sizes[0] for bs in batch_sizes) - (h is None)  # steps with the whole batch
    step_ = _step_matmul(w_hh, batch_sizes[0], full, lib, addmm_)
    nones = [None] * len(batch_sizes)
    steps = zip(acts.split(batch_sizes), cs.split(batch_sizes), rs.split(batch_sizes), hs.split(batch_sizes),
                ms.split(batch_sizes) if ms is not None else nones)
    for a, c_t, r_t, h_t, m_t in steps:
        bs = a.size(0)                               # sequences still running (a prefix of the batch)
        if h is not None:
            step_(a, h[:bs])                         # (bs, 4H) += h W_hh^T: pre-activations, g's doubled
        h, c = _cell(a, c[:bs] if c is not None else None, c_t, r_t, h_t, m_t, w_hr, linear)
    return hs, (acts, cs, rs, ms)


class _LSTMLayer(torch.autograd.Function):
    """One layer in one direction, with backpropagation through time written out.

    Inputs: x (T, H_in), w_ih (4H, H_in), b (4H,) or None, h0 (N, H_out) or None (zeros),
    c0 (N, H) or None, w_hh (4H, H_out), w_hr (H_out, H) or None, batch_sizes (list),
    last: the rows of each sequence's last step (_last_rows).
    Outputs: hs (T, H_out), h_n = hs[last], c_n = cs[last].
    """

    @staticmethod
    def forward(ctx, x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes, last):
        hs, (acts, cs, rs, ms) = _recurrence(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes)
        ctx.batch_sizes, ctx.last = batch_sizes, last
        ctx.save_for_backward(x, w_ih, h0, c0, w_hh, w_hr, hs, acts, cs, rs, ms)
        return (hs,) + _final_states(hs, cs, last)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs, d_hn, d_cn):
        x, w_ih, h0, c0, w_hh, w_hr, hs, acts, cs, rs, ms = ctx.saved_tensors
        batch_sizes, last, H, N = ctx.batch_sizes, ctx.last, cs.size(1), ctx.batch_sizes[0]
        # What does not depend on the recurrence is done for all steps at once, in place in
        # d_acts, which the loop then turns into the gradient of the pre-activations. With
        # c' = f*c + i*g, h' = o*tanh(c'), sigmoid' = s(1-s), g = 2 sigmoid(a) - 1 for g's
        # (doubled) pre-activation a, and tanh(c') = 1 - 2r:
        #   dc' = dh' * o*(1 - tanh(c')^2) + (dc' sent back from step t+1, or from c_n)
        #   da_i = dc' * g*i(1-i)      da_f = dc' * c*f(1-f)
        #   da_g = dc' * i*2s(1-s)     da_o = dh' * tanh(c')*o(1-o)
        # where c is the previous memory (zero, or c0, at the first step).
        i, f, s, o = acts.chunk(4, 1)                                   # each (T, H)
        d_acts = torch.addcmul(acts, acts, acts, value=-1)              # (T, 4H) each gate's sigmoid' = s - s*s
        di, df, ds, do = d_acts.chunk(4, 1)
        torch.addcmul(di, di, s, value=-2, out=di).neg_()               # i(1-i) * g
        ds.mul_(i).mul_(2)                                              # s(1-s) * 2i
        torch.addcmul(do, do, rs, value=-2, out=do)                     # o(1-o) * tanh(c')
        dc_dm = torch.addcmul(rs, rs, rs, value=-1).mul_(o)             # (T, H) o*(1 - tanh(c')^2) / 4 = o*r(1-r)
        # dh' of every row: the output's gradient, h_n's for last steps; later steps add theirs
        d_h = d_hs.clone(memory_format=torch.contiguous_format)         # (T, H_out)
        if isinstance(last, slice):
            d_h[last] += d_hn
        else:
            d_h.index_add_(0, last, d_hn)
        dc_carry = d_cn.clone(memory_format=torch.contiguous_format)    # (N, H) dc' from later steps / c_n
        linear, addmm_, wgrad = _matmuls(cpu_matmul(d_acts))
        c_prev = [c0] + _previous_rows(cs, batch_sizes)                 # each step's previous memory
        rows = list(zip(d_h.split(batch_sizes), d_acts.split(batch_sizes), dc_dm.split(batch_sizes),
                        f.split(batch_sizes), c_prev))
        for t in range(len(rows) - 1, -1, -1):
            dh, da, dcdm, f_t, c_t = rows[t]
            bs = dh.size(0)
            dm = dh if w_hr is None else linear(dh, w_hr.t())           # (bs, H) dm = dh W_hr
            dc = torch.addcmul(dc_carry[:bs], dm, dcdm, value=4)        # (bs, H)
            da4 = da.view(bs, 4, H)
            da4[:, :3].mul_(dc.unsqueeze(1))                            # da_i, da_g; da_f needs c too:
            da4[:, 1].mul_(c_t) if c_t is not None else da4[:, 1].zero_()
            da4[:, 3].mul_(dm)                                          # da_o
            torch.mul(dc, f_t, out=dc_carry[:bs])                       # dc for step t-1
            if t > 0:
                addmm_(rows[t - 1][0][:bs], da, w_hh.t())               # dh for step t-1 += da W_hh
        needs = ctx.needs_input_grad
        d_x = linear(d_acts, w_ih.t()) if needs[0] else None            # (T, H_in) = d_acts W_ih
        d_w_ih = wgrad(d_acts, x) if needs[1] else None                 # (4H, H_in)
        d_b = d_acts.sum(0) if needs[2] else None                       # (4H,)
        d_h0 = linear(d_acts[:N], w_hh.t()) if needs[3] else None       # (N, H_out)
        d_c0 = dc_carry if needs[4] else None                           # (N, H)
        d_w_hh = d_w_hr = None
        if needs[5]:
            # row by row, the h(t-1) each step read: h0 (skipped when zero), then the rows of
            # the previous step that continue; without padding that is just hs shifted by N
            if batch_sizes[-1] == N:
                h_prev = hs[:-N] if h0 is None else torch.cat([h0, hs[:-N]])
            else:
                h_prev = torch.cat(([h0] if h0 is not None else []) + _previous_rows(hs, batch_sizes))
            d_w_hh = wgrad(d_acts[N if h0 is None else 0:], h_prev)     # (4H, H_out)
        if w_hr is not None and needs[6]:
            d_w_hr = wgrad(d_h, ms)                                     # (H_out, H)
        return d_x, d_w_ih, d_b, d_h0, d_c0, d_w_hh, d_w_hr, None, None


def _previous_rows(x, batch_sizes):
    """For every step t >= 1, the rows of step t-1 that step t continues: x_{t-1}[:batch_sizes[t]]."""
    chunks = x.split(batch_sizes)
    return [chunks[t - 1][:bs] for t, bs in enumerate(batch_sizes) if t > 0]


def _last_rows(batch_sizes, device):
    """Which rows of packed data hold each sequence's last step: LongTensor (N,), or,
    when all sequences are equally long, the slice of the last N rows (cheaper)."""
    if batch_sizes[-1] == batch_sizes[0]:
        return slice(len(batch_sizes) * batch_sizes[0] - batch_sizes[0], None)
    bs = torch.tensor(batch_sizes)                                      # (L,)
    starts = torch.cumsum(bs, 0) - bs                                   # (L,) first row of each step
    lengths = (bs.unsqueeze(0) > torch.arange(batch_sizes[0]).unsqueeze(1)).sum(1)  # (N,)
    return (starts[lengths - 1] + torch.arange(batch_sizes[0])).to(device)


def lstm_layer(cell, x, batch_sizes, h0=None, c0=None, last=None):
    """Run one cell over a whole batch of sequences, forward in time.

    Args:
        cell: the my_LSTMCell whose weights to use
        x: (T, H_in), packed time-major rows (see the diagram above)
        batch_sizes: list of ints, non-increasing, summing to T
        h0: (N, H_out), c0: (N, H), with N = batch_sizes[0]; None means zeros
        last: each sequence's last row, from _last_rows (computed when not given)

    Returns: out (T, H_out), h_n (N, H_out), c_n (N, H), where each sequence's h_n and c_n
    are its states after its own last step.
    """
    if last is None:
        last = _last_rows(batch_sizes, x.device)
    # a single step from a given state (greedy decoding) can take both matmuls as one
    single = len(batch_sizes) == 1 and h0 is not None
    (w_ih, w_hh, b, w_hr), w_joint = cell.fused_weights(joint=True) if single else (cell.fused_weights(), None)
    if torch.is_autocast_enabled(x.device.type):
        # autocast does not reach inside _LSTMLayer: run the whole layer, states included, in
        # the autocast dtype, as autocast runs cuDNN's LSTM (the casts are differentiable, so the
        # float32 gate weights still get their gradients)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_ih, b, h0, c0, w_hh, w_hr = (t if t is None else t.to(dtype) for t in (x, w_ih, b, h0, c0, w_hh, w_hr))
        with torch.autocast(x.device.type, enabled=False):
            return _run_layer(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes, last, None)
    if x.dtype != w_ih.dtype:
        raise RuntimeError(f"my_LSTM: input must have the type {w_ih.dtype}, got type {x.dtype}")
    return _run_layer(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes, last, w_joint)


def _run_layer(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes, last, w_joint):
    """lstm_layer's work on weights already fused (and cast): autograd Function or plain loop."""
    args = (x, w_ih, b, h0, c0, w_hh, w_hr)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _LSTMLayer.apply(*args, batch_sizes, last)
    if w_joint is not None:                                             # one step from a given state
        h, c = _step(x, h0, c0, w_joint, b, w_hr)
        return h, h, c
    hs, (_, cs, _, _) = _recurrence(*args, batch_sizes)                 # inference: nothing to save
    if isinstance(last, slice):
        return hs, hs[last], cs[last]                                   # views will do: no autograd here
    return (hs,) + _final_states(hs, cs, last)


def _final_states(hs, cs, last):
    """(h_n, c_n), each (N, .): the rows of each sequence's last step (see _last_rows)."""
    if isinstance(last, slice):
        return hs[last].clone(), cs[last].clone()
    return hs.index_select(0, last), cs.index_select(0, last)


def _reversed_rows(batch_sizes, device):
    """LongTensor (T,): the row permutation of packed data that reverses every sequence in time.

    Row (t, b) of a sequence of length L_b goes to row (L_b - 1 - t, b); the permutation
    is its own inverse, so it also maps the reverse layer's output back.
    """
    bs = torch.tensor(batch_sizes)                                       # (L,)
    starts = torch.cumsum(bs, 0) - bs                                    # (L,) first row of each step
    lengths = (bs.unsqueeze(0) > torch.arange(batch_sizes[0]).unsqueeze(1)).sum(1)  # (N,)
    t = torch.repeat_interleave(torch.arange(len(batch_sizes)), bs)      # (T,) step of each row
    b = torch.arange(int(bs.sum())) - starts[t]                          # (T,) sequence of each row
    return (starts[lengths[b] - 1 - t] + b).to(device)


class my_LSTM(nn.Module):
    r"""A multi-layer LSTM, a drop-in for ``nn.LSTM``: same arguments, inputs, outputs and state dict keys.

    For each element in the input sequence, each layer computes (see my_LSTMCell)::

        i_t = sigmoid(W_ii x_t + b_ii + W_hi h_(t-1) + b_hi)
        f_t = sigmoid(W_if x_t + b_if + W_hf h_(t-1) + b_hf)
        g_t = tanh(W_ig x_t + b_ig + W_hg h_(t-1) + b_hg)
        o_t = sigmoid(W_io x_t + b_io + W_ho h_(t-1) + b_ho)
        c_t = f_t * c_(t-1) + i_t * g_t
        h_t = o_t * tanh(c_t)          (h_t = W_hr (o_t * tanh(c_t)) if proj_size > 0)

    Layer k > 0 reads layer k-1's h_t, after dropout in training mode when dropout > 0.

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

    Inputs: input, (h_0, c_0)
        * input: (L, H_in) unbatched, (L, N, H_in), (N, L, H_in) if batch_first=True, or a
          PackedSequence (``pack_padded_sequence``/``pack_sequence``, sorted or not)
        * h_0: (D * num_layers, H_out) unbatched or (D * num_layers, N, H_out); zeros if not given
        * c_0: (D * num_layers, H) unbatched or (D * num_layers, N, H); zeros if not given

    Outputs: output, (h_n, c_n)
        * output: (L, D * H_out), (L, N, D * H_out), (N, L, D * H_out) if batch_first=True,
          or a PackedSequence with the input's batch_sizes, sorted_indices and unsorted_indices
        * h_n: (D * num_layers, N, H_out) (or without N), each sequence's state after its own
          last step, in the caller's batch order; for D = 2, index 2k is layer k's forward
          direction, 2k + 1 its reverse
        * c_n: (D * num_layers, N, H) (or without N), likewise

    where: N = batch size, L = sequence length, D = 2 if bidirectional else 1,
        H_in = input_size, H = hidden_size, H_out = proj_size if proj_size > 0 else hidden_size

    Attributes:
        cells: ``nn.ModuleDict`` of my_LSTMCell named like nn.LSTM's weight suffixes:
            'l0', 'l0_reverse', 'l1', ... (so ``cells.l0.fc_ii.weight`` is W_ii of layer 0)

    Weights are exchanged with nn.LSTM through ``my_LSTM.from_lstm(lstm)``, ``m.to_lstm()``, and
    ``load_state_dict``, which also accepts nn.LSTM's keys (``weight_ih_l0``, ...), also when
    this module sits inside another one, so a decoder trained with nn.LSTM loads as is.

    .. note:: As in nn.LSTM, every weight and bias starts from U(-k, k) with k = 1/sqrt(hidden_size).

    .. note:: When no gradient is needed (``torch.no_grad()``), each layer keeps its last
        concatenation of the per-gate weights (see my_LSTMCell.fused_weights).

    .. note:: The backward is written out by hand (once differentiable): gradients of
        gradients (``create_graph=True``) through my_LSTM raise an error; the per-gate
        my_LSTMCell supports them.

    Examples::

        >>> rnn = my_LSTM(10, 20, 2)
        >>> input = torch.randn(5, 3, 10)
        >>> h0, c0 = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
        >>> output, (hn, cn) = rnn(input, (h0, c0))
        >>> output.shape, hn.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
        >>> torch.allclose(rnn.to_lstm()(input, (h0, c0))[0], output, atol=1e-6)
        True
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        _check_sizes('my_LSTM', input_size, hidden_size, proj_size)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"my_LSTM: num_layers must be an integer greater than zero, got {num_layers!r}")
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("my_LSTM: dropout should be a number in range [0, 1] representing the "
                             f"probability of an element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("my_LSTM: dropout option adds dropout after all but last recurrent layer, so non-zero "
                          f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        num_directions = 2 if bidirectional else 1
        h_out = proj_size if proj_size > 0 else hidden_size
        self.cells = nn.ModuleDict()
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else h_out * num_directions
            for suffix in ('', '_reverse')[:num_directions]:
                self.cells[f'l{layer}{suffix}'] = my_LSTMCell(layer_input, hidden_size, bias, device, dtype,
                                                              proj_size=proj_size)

    def reset_parameters(self):
        for cell in self.cells.values():
            cell.reset_parameters()

    def flatten_parameters(self):
        """A no-op, for code written for nn.LSTM (there is nothing to flatten here)."""

    def train(self, mode=True):
        # a switch to eval (or back) drops the inference caches of concatenated weights: an
        # optimizer whose in-place update does not bump version counters (fused Adam) must not
        # leave evaluation with stale weights
        for cell in self.cells.values():
            cell.clear_cache()
        return super().train(mode)

    def forward(self, input, hx=None):
        D = 2 if self.bidirectional else 1
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        # 1. everything becomes packed time-major rows x (T, H_in) with batch_sizes
        if packed:
            x, batch_sizes_t, sorted_indices, unsorted_indices = input
            batch_sizes = batch_sizes_t.tolist()
            N, batched = batch_sizes[0], True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"my_LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            seq = input if batched else input.unsqueeze(1)                    # (L, N, H_in) or (N, L, H_in)
            if batched and self.batch_first:
                seq = seq.transpose(0, 1)                                     # (L, N, H_in)
            L, N = seq.shape[:2]
            x = seq.reshape(L * N, seq.size(2))                               # (T, H_in), T = L * N
            batch_sizes = [N] * L
        if x.size(-1) != self.input_size:
            raise RuntimeError(f"my_LSTM: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {x.size(-1)}")
        # 2. initial states (D * num_layers, N, .), in the packed (sorted) batch order;
        # None stands for zeros (the layers skip work on them)
        if hx is None:
            h0 = c0 = [None] * (self.num_layers * D)
        else:
            h0, c0 = hx
            want = 3 if batched else 2
            if h0.dim() != want or c0.dim() != want:
                raise RuntimeError(f"my_LSTM: For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx and cx "
                                   f"should also be {want}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            for k, (state, size) in enumerate(((h0, h_out), (c0, self.hidden_size))):
                expected = (self.num_layers * D, N, size)
                if tuple(state.shape) != expected:
                    raise RuntimeError(f"my_LSTM: Expected hidden[{k}] size {expected}, got {list(state.shape)}")
            if packed and sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        # 3. the stack: layer by layer, each direction with its own cell
        last = _last_rows(batch_sizes, x.device)                              # (N,) each sequence's last row
        reverse = _reversed_rows(batch_sizes, x.device) if D == 2 else None
        cells = list(self.cells.values())                                     # l0, l0_reverse, l1, ...
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d in range(D):
                k = layer * D + d
                x_d = x if d == 0 else x.index_select(0, reverse)            # every sequence reversed in time
                out, h, c = lstm_layer(cells[k], x_d, batch_sizes, h0[k], c0[k], last)
                outputs.append(out if d == 0 else out.index_select(0, reverse))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, 1) if D == 2 else outputs[0]              # (T, D * H_out)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        if len(h_n) == 1:                                                    # (D * num_layers, N, .)
            h_n, c_n = h_n[0].unsqueeze(0), c_n[0].unsqueeze(0)
        else:
            h_n, c_n = torch.stack(h_n), torch.stack(c_n)
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

    def _config(self):
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                    bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                    bidirectional=self.bidirectional, proj_size=self.proj_size)

    @classmethod
    def from_lstm(cls, lstm):
        """A my_LSTM with lstm's configuration, device, dtype, mode and (copied) weights."""
        w = lstm.weight_ih_l0
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # nn.LSTM already warned about dropout with one layer
            m = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                    lstm.dropout, lstm.bidirectional, lstm.proj_size, device=w.device, dtype=w.dtype)
        m.load_state_dict(lstm.state_dict())
        return m.train(lstm.training)

    def to_lstm(self):
        """An nn.LSTM with this module's configuration, device, dtype, mode and (copied) weights."""
        w = self.cells['l0'].fc_ii.weight
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            lstm = nn.LSTM(**self._config(), device=w.device, dtype=w.dtype)
        lstm.load_state_dict(self.lstm_state_dict())
        return lstm.train(self.training)

    def lstm_state_dict(self):
        """This module's weights under nn.LSTM's keys (weight_ih_l0, ..., weight_hr_l0_reverse), detached."""
        with torch.no_grad():
            return {f'{name}_{suffix}': w.detach().clone()
                    for suffix, cell in self.cells.items() for name, w in cell.lstm_weights().items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept nn.LSTM's keys: 'weight_ih_l0' (4*H, H_in) becomes 'cells.l0.fc_ii.weight' ...
        # 'cells.l0.fc_io.weight', each (H, H_in). This runs with the full prefix (e.g.
        # 'lstm.') when we are a submodule, before the children read their keys, so
        # decoder.load_state_dict(nn_lstm_decoder_state_dict) works, strict included.
        for suffix, cell in self.cells.items():
            for name, parts in LSTM_LAYOUT.items():
                key = f'{prefix}{name}_{suffix}'
                if key in state_dict:
                    value = state_dict.pop(key)
                    for part, chunk in zip(parts, value.chunk(len(parts)) if len(parts) > 1 else [value]):
                        state_dict[f'{prefix}cells.{suffix}.{part}'] = chunk
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        s = f'{self.input_size}, {self.hidden_size}'
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0)
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f', {name}={getattr(self, name)}'
        return s
