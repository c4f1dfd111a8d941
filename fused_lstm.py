r"""The speed machinery behind ``my_LSTM(..., fused=True)``: one LSTM layer as one autograd Function.

DIY_LSTM.py is the LSTM to read: its layer runs ``my_LSTMCell`` step by step and autograd
does the backward. This module computes the same layer, the same equations on the same
parameters, faster:

    flat weights   each cell's per-gate parameters are views into one buffer in nn.LSTM's
                   layout (W_ih (4H, H_in), W_hh (4H, H_out), ...), as nn.LSTM's own
                   flatten_parameters does, so the layer reads nn.LSTM-shaped matrices with
                   no copy, and always the current values, however they were updated
    _LSTMLayer     the forward writes every step's gates into preallocated (T, .) buffers;
                   the backward (backpropagation through time) is written out by hand, and
                   gets dW_ih, dW_hh and dx from one big matmul each over all steps
    _step          one step from a given state without autograd (greedy decoding)
    cpu_matmul     which CPU library multiplies the matrices (MKL, with W_hh packed once
                   per call for the per-step GEMM, or oneDNN)

A "cell" here is anything with DIY_LSTM's ``lstm_layout()``: (nn.LSTM name, [per-gate
parameters in i, f, g, o order]) pairs. This module does not import DIY_LSTM.

Sequences come as packed time-major rows, the layout of PackedSequence.data (DIY_LSTM's
layer docstring draws it): x (T, H_in), batch_sizes non-increasing, step t's rows are the
first batch_sizes[t] sequences.
"""
import operator
import os

import torch

from utils import cpu_info

# --------------------------------------------------------------------------------------
# Flat weights: per-gate parameters as views into one buffer per cell
# --------------------------------------------------------------------------------------


def flatten(cell):
    """Make cell's per-gate parameters views into one new buffer, in nn.LSTM's layout.

    Returns {nn.LSTM name: tensor} (e.g. 'weight_ih' (4H, H_in), whose rows [0:H] are
    fc_ii.weight, [H:2H] fc_if.weight ...), or None when the parameters cannot share a
    buffer (not all nn.Parameter leaves of one dtype and device: functional_call's
    tensors, parametrizations, the meta device, where storage addresses mean nothing).
    """
    layout = list(cell.lstm_layout())
    params = [p for _, ps in layout for p in ps]
    first = params[0]
    cell._flat_lstm = None
    if first.is_meta or any(not isinstance(p, torch.nn.Parameter) or p.dtype != first.dtype
                            or p.device != first.device for p in params):
        return None
    buffer = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    flat, offset = {}, 0
    with torch.no_grad():
        for name, ps in layout:
            n = sum(p.numel() for p in ps)
            whole = buffer[offset:offset + n].view((-1,) + tuple(ps[0].shape[1:]))  # e.g. (4H, H_in)
            for p, part in zip(ps, whole.split([p.size(0) for p in ps])):
                part.copy_(p)
                p.data = part                      # the parameter now lives in the buffer
            flat[name] = whole
            offset += n
    # What must still hold for the buffer to be the parameters: the cell holds the same
    # Linear layers, they hold the same Parameters, and those live at the same addresses.
    # .to(), p.data = ..., load_state_dict(assign=True) or a new Parameter break it;
    # in-place updates (optimizers, copy_, nn.init) do not. _flat checks all three with
    # C-level loops (map), because greedy decoding pays for this check at every token.
    where = {id(p): (m._parameters, name) for m in cell._modules.values() if m is not None
             for name, p in m._parameters.items() if p is not None}
    owners, names = zip(*(where[id(p)] for p in params))      # each Parameter's dict, and its key there
    checks = (tuple(cell._modules.values()), owners, names, tuple(params), tuple(p.data_ptr() for p in params))
    lstm_names = ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh', 'weight_hr')
    cell._flat_lstm = (flat, checks, dict(layout), tuple(flat.get(k) for k in lstm_names))
    return flat


def _flat(cell):
    """cell._flat_lstm if the parameters still live in its buffer, else after flattening anew
    (None where they cannot, see flatten): (flat weights, checks, {name: per-gate parameters},
    the flat weights as lstm_weights returns them)."""
    state = cell.__dict__.get('_flat_lstm')
    if state is not None:
        modules, owners, names, params, ptrs = state[1]
        if (all(map(operator.is_, cell._modules.values(), modules))
                and all(map(operator.is_, map(dict.get, owners, names), params))
                and tuple(map(torch.Tensor.data_ptr, params)) == ptrs):
            return state
    flatten(cell)
    return cell._flat_lstm


class _Joined(torch.autograd.Function):
    """whole, an nn.LSTM-layout tensor the parts live in, with the parts' gradients routed back.

    What torch.cat(parts) does for autograd, without copying the values.
    """

    @staticmethod
    def forward(ctx, whole, *parts):
        ctx.sizes = [p.size(0) for p in parts]
        return whole.view_as(whole)

    @staticmethod
    def backward(ctx, grad):
        return (None,) + tuple(grad.split(ctx.sizes))


def lstm_weights(cell):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) in nn.LSTM's layout, current, differentiable w.r.t. the
    per-gate parameters; b_ih, b_hh, w_hr are None where the cell has none."""
    state = _flat(cell)
    grad = torch.is_grad_enabled()
    if state is not None and not grad:
        return state[3]                                   # greedy decoding: nothing to route
    layout = state[2] if state is not None else dict(cell.lstm_layout())
    out = {}
    for name, ps in layout.items():
        if state is None:
            out[name] = torch.cat(ps) if len(ps) > 1 else ps[0]
        elif grad and any(p.requires_grad for p in ps):
            out[name] = _Joined.apply(state[0][name], *ps)
        else:
            out[name] = state[0][name]
    return tuple(out.get(k) for k in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh', 'weight_hr'))


# --------------------------------------------------------------------------------------
# CPU matmuls
# --------------------------------------------------------------------------------------
# On the CPU, which library multiplies the float32 matrices matters as much as anything
# else here. PyTorch's matmuls call MKL; nn.LSTM's CPU kernel calls oneDNN. MKL is Intel's:
# on Intel CPUs it is as fast as oneDNN or faster at the LSTM's shapes, and its packed GEMM
# (_step_matmul) beats both for the per-step product; on AMD CPUs MKL takes slower code
# paths and oneDNN's matmul is faster (bench/bench_lstm.py --cpu_matmul measures both).
# So CPU_MATMUL = 'auto' calls oneDNN on AMD CPUs and MKL (through torch.mm) elsewhere;
# 'mkl' or 'onednn' forces one, in code or for a whole run through the environment
# (LSTM_CPU_MATMUL=onednn python train.py ...). Either gives float32 results to rounding;
# other dtypes and devices always use torch.mm.
CPU_MATMUL = os.environ.get('LSTM_CPU_MATMUL', 'auto')

# oneDNN's linear layer and MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute): the
# ops torch.compile's CPU backend calls for nn.Linear; None in builds without them
_ONEDNN_LINEAR = getattr(getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise', None), 'default', None)
try:
    _MKL_PACK, _MKL_LINEAR = torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
except (AttributeError, RuntimeError):
    _MKL_PACK = _MKL_LINEAR = None


_CPU_VENDOR = cpu_info('vendor_id')  # 'GenuineIntel', 'AuthenticAMD', ...; '' where unknown


def cpu_matmul(t, choice=None):
    """The library the layer multiplies tensors like t with: 'onednn', 'mkl' or 'torch', as
    `choice` (default: CPU_MATMUL) asks and this torch build allows."""
    choice = CPU_MATMUL if choice is None else choice
    if t.device.type != 'cpu' or t.dtype != torch.float32:
        return 'torch'
    if choice not in ('auto', 'mkl', 'onednn'):
        raise ValueError("fused_lstm: CPU_MATMUL (or LSTM_CPU_MATMUL in the environment) must be 'auto', 'mkl' "
                         f"or 'onednn', got {choice!r}")
    onednn = choice == 'onednn' or (choice == 'auto' and _CPU_VENDOR == 'AuthenticAMD')
    if onednn and _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return 'onednn'
    return 'mkl' if torch.backends.mkl.is_available() else 'torch'


def cpu_matmuls():
    """The CPU matmul libraries this torch build lets the layer call: ['mkl', 'onednn'] or fewer."""
    return [lib for lib in ('mkl', 'onednn') if cpu_matmul(torch.zeros(1), lib) == lib]


def _matmuls(lib):
    """The layer's matmuls on library lib (from cpu_matmul), as (linear, addmm_, wgrad):
        linear(x, w, b=None) = x @ w^T + b      (F.linear; w may be a transposed view)
        addmm_(out, x, w):      out += x @ w^T, in place
        wgrad(d, x)           = d^T @ x         (a weight gradient: d (T, out), x (T, in))
    None of them records an autograd graph (oneDNN's op has no backward): they are only
    called inside _LSTMLayer, or without a graph.
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
    if x.numel() == 0 or w.numel() == 0:
        # oneDNN cannot make an inner product with a zero-sized dimension (an empty batch,
        # or the backward's d W_hh of a one-step sequence, which multiplies over no rows)
        return _linear(x, w, b)
    return _ONEDNN_LINEAR(x, w, b, 'none', [], '')


def _onednn_addmm_(out, x, w):
    return out.add_(_onednn_linear(x, w))


def _onednn_wgrad(d, x):
    return _onednn_linear(x.t().contiguous(), d.t()).t()    # as (x^T d)^T: the layout oneDNN is fastest at


def _step_matmul(w, n, uses, lib, addmm_):
    """step_(out, x): out += x @ w^T, in place, for the forward's per-step matmul.

    Every step multiplies by the same w (4H, H_out), so on MKL it pays to do what oneDNN's
    RNN (nn.LSTM's CPU kernel) does: reorder w once into the GEMM kernel's blocked layout
    instead of letting every step's sgemm repack it. The packed layout is made for one row
    count n, so only steps with n rows use it (all of a dense batch, the first steps of a
    packed one); packing costs about one step, hence `uses`. The backward's da W_hh stays
    on addmm_: it would need W_hh^T packed, and transposing W_hh costs more than packing saves.
    """
    if _MKL_PACK is not None and uses >= 4 and n > 0 and lib == 'mkl':
        packed = _MKL_PACK(w, n)

        def step_(out, x):
            if x.size(0) != n:
                return addmm_(out, x, w)
            return out.add_(_MKL_LINEAR(x, packed, w, None, n))
        return step_
    return lambda out, x: addmm_(out, x, w)


# --------------------------------------------------------------------------------------
# One step's gate math, and the layer's forward
# --------------------------------------------------------------------------------------


def _cell(a, c, c_out=None, r_out=None, h_out=None, m_out=None, w_hr=None, linear=_linear):
    """One step's gates from its pre-activations a (N, 4H): my_LSTMCell.forward's equations.

    torch.tanh is avoided on purpose: on CPU it runs through MKL's VML, which is several
    times slower than torch.sigmoid on some CPUs, and at 2 threads on a busy machine can wait
    a scheduler tick for a 512-element tensor. tanh(x) = 2 sigmoid(2x) - 1 = 1 - 2 sigmoid(-2x),
    so one sigmoid call covers all four gates (with g's pre-activation doubled), and one more
    gives tanh(c'). a is overwritten by the sigmoids (i, f, sg, o), where g = 2 sg - 1.

    c: (N, H) the previous memory, None for zeros. The *_out buffers, when given, receive
    c' (N, H), r = sigmoid(-2c') (N, H), h' (N, H_out) and, with a projection, o * tanh(c')
    (multiplied by w_hr with `linear`). Returns (h', c').
    """
    H = a.size(1) // 4
    a[:, 2 * H:3 * H].mul_(2)
    i, f, sg, o = a.sigmoid_().chunk(4, 1)           # each (N, H)
    if c is not None:
        c = torch.mul(f, c, out=c_out).addcmul_(i, sg, value=2).sub_(i)    # c' = f*c + i*(2 sg - 1) = f*c + i*g
    else:
        c = torch.mul(i, sg, out=c_out).mul_(2).sub_(i)                    # c' = i*g when c = 0
    r = torch.mul(c, -2, out=r_out).sigmoid_()       # tanh(c') = 1 - 2r
    if w_hr is None:
        h = torch.addcmul(o, o, r, value=-2, out=h_out)                    # h' = o*tanh(c') = o - 2*o*r
    else:
        m = torch.addcmul(o, o, r, value=-2, out=m_out)                    # o*tanh(c')
        h = linear(m, w_hr)                                                # h' = W_hr (o*tanh(c'))
        h = h_out.copy_(h) if h_out is not None else h
    return h, c


def _step(x, h, c, w_ih, w_hh, b, w_hr):
    """One step from a given state, without autograd (greedy decoding): returns (h', c').
    x (N, H_in), h (N, H_out), c (N, H).

    The gates as my_LSTMCell writes them, one op each: at batch 1 a step costs its number
    of ops more than their size, and _cell's sigmoid-only form takes more ops. What _cell
    avoids torch.tanh for matters little here: a slower tanh of a few hundred elements, and
    one more parallel region where the matmuls already have two.
    """
    linear, addmm_, _ = _matmuls(cpu_matmul(x))
    i, f, g, o = addmm_(linear(x, w_ih, b), h, w_hh).chunk(4, 1)           # pre-activations, each (N, H)
    c = torch.sigmoid(f).mul_(c).addcmul_(torch.sigmoid(i), torch.tanh(g))  # c' = f*c + i*g
    h = torch.sigmoid(o).mul_(torch.tanh(c))                               # h' = o*tanh(c')
    return (h, c) if w_hr is None else (linear(h, w_hr), c)


def _recurrence(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes):
    """Forward of one layer in one direction; returns hs (T, H_out) and what the backward
    needs: the gates' sigmoids (T, 4H), cs (T, H), rs = sigmoid(-2c) (T, H) and, with a
    projection, ms = o * tanh(c) (T, H). h0 None means zeros."""
    T, H = x.size(0), w_hh.size(0) // 4
    lib = cpu_matmul(x)
    linear, addmm_, _ = _matmuls(lib)
    acts = linear(x, w_ih, b)                        # (T, 4H) the input side of every step
    cs = x.new_empty(T, H)
    rs = x.new_empty(T, H)
    hs = x.new_empty(T, w_hh.size(1))
    ms = x.new_empty(T, H) if w_hr is not None else None
    h, c = h0, c0
    full = sum(bs == batch_sizes[0] for bs in batch_sizes) - (h is None)  # steps with the whole batch
    step_ = _step_matmul(w_hh, batch_sizes[0], full, lib, addmm_)
    nones = [None] * len(batch_sizes)
    steps = zip(acts.split(batch_sizes), cs.split(batch_sizes), rs.split(batch_sizes), hs.split(batch_sizes),
                ms.split(batch_sizes) if ms is not None else nones)
    for a, c_t, r_t, h_t, m_t in steps:
        bs = a.size(0)                               # sequences still running (a prefix of the batch)
        if h is not None:
            step_(a, h[:bs])                         # (bs, 4H) += h W_hh^T
        h, c = _cell(a, c[:bs] if c is not None else None, c_t, r_t, h_t, m_t, w_hr, linear)
    return hs, (acts, cs, rs, ms)


# --------------------------------------------------------------------------------------
# The layer as an autograd Function, with backpropagation through time written out
# --------------------------------------------------------------------------------------


class _LSTMLayer(torch.autograd.Function):
    """One layer in one direction.

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
    def backward(ctx, d_hs, d_hn, d_cn):
        if torch.is_grad_enabled():
            # the engine enables grad mode in a backward only for create_graph=True; the
            # hand-written backward records no graph, so its gradients would have none
            raise RuntimeError("my_LSTM: the fused path's backward is written by hand and cannot be differentiated "
                               "again (create_graph=True); use the plain path: my_LSTM(..., fused=False), "
                               "or set lstm.fused = False")
        x, w_ih, h0, c0, w_hh, w_hr, hs, acts, cs, rs, ms = ctx.saved_tensors
        batch_sizes, last, H, N = ctx.batch_sizes, ctx.last, cs.size(1), ctx.batch_sizes[0]
        # What does not depend on the recurrence is done for all steps at once, in place in
        # d_acts, which the loop then turns into the gradient of the pre-activations. With
        # c' = f*c + i*g, h' = o*tanh(c'), sigma' = sigma(1-sigma), g = 2 sg - 1 = 2 sigma(2a) - 1
        # for g's pre-activation a, and tanh(c') = 1 - 2r:
        #   dc' = dh' * o*(1 - tanh(c')^2) + (dc' sent back from step t+1, or from c_n)
        #   da_i = dc' * g*i(1-i)      da_f = dc' * c*f(1-f)
        #   da_g = dc' * i*4sg(1-sg)   da_o = dh' * tanh(c')*o(1-o)
        # where c is the previous memory (zero, or c0, at the first step).
        i, f, sg, o = acts.chunk(4, 1)                                  # each (T, H)
        d_acts = torch.addcmul(acts, acts, acts, value=-1)              # (T, 4H) each gate's sigma' = sigma - sigma^2
        di, df, dsg, do = d_acts.chunk(4, 1)
        torch.addcmul(di, di, sg, value=-2, out=di).neg_()              # i(1-i) * g
        dsg.mul_(i).mul_(4)                                             # sg(1-sg) * 4i
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


def _final_states(hs, cs, last):
    """(h_n, c_n), each (N, .): the rows of each sequence's last step (see _last_rows)."""
    if isinstance(last, slice):
        return hs[last].clone(), cs[last].clone()
    return hs.index_select(0, last), cs.index_select(0, last)


def lstm_layer(cell, x, batch_sizes, h0=None, c0=None):
    """Run cell over a batch of packed sequences, forward in time: DIY_LSTM.lstm_layer, fast.

    Args:
        cell: the my_LSTMCell whose weights to use
        x: (T, H_in), packed time-major rows
        batch_sizes: list of ints, non-increasing, summing to T
        h0: (N, H_out), c0: (N, H), with N = batch_sizes[0]; None means zeros

    Returns: out (T, H_out), h_n (N, H_out), c_n (N, H), each sequence's h_n and c_n being
    its states after its own last step.
    """
    w_ih, w_hh, b_ih, b_hh, w_hr = lstm_weights(cell)
    b = b_ih + b_hh if b_ih is not None else None    # both biases get the same gradient, as in nn.LSTM
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # autocast does not reach inside _LSTMLayer: run the whole layer in the autocast
        # dtype, as autocast runs cuDNN's LSTM (the casts are differentiable, so float32
        # weights still get their gradients)
        dtype = torch.get_autocast_dtype(device)
        x, w_ih, b, h0, c0, w_hh, w_hr = (t if t is None else t.to(dtype) for t in (x, w_ih, b, h0, c0, w_hh, w_hr))
        with torch.autocast(device, enabled=False):
            return _run(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes)
    return _run(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes)


def _run(x, w_ih, b, h0, c0, w_hh, w_hr, batch_sizes):
    """lstm_layer's work on nn.LSTM-layout weights: the autograd Function, or, with no
    gradient to compute, the forward alone (one step from a given state: _step)."""
    args = (x, w_ih, b, h0, c0, w_hh, w_hr)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _LSTMLayer.apply(*args, batch_sizes, _last_rows(batch_sizes, x.device))
    if len(batch_sizes) == 1 and h0 is not None:
        h, c = _step(x, h0, c0, w_ih, w_hh, b, w_hr)
        return h, h, c
    last = _last_rows(batch_sizes, x.device)
    hs, (_, cs, _, _) = _recurrence(*args, batch_sizes)
    if isinstance(last, slice):
        return hs, hs[last], cs[last]                                   # views will do: no autograd here
    return (hs,) + _final_states(hs, cs, last)
