"""my_LSTM against nn.LSTM with copied weights: outputs, states, gradients, errors, state dicts,
on both paths (fused=True: fused_lstm.py; fused=False: DIY_LSTM's cell step by step).

    python -m pytest tests/test_diy_lstm.py -q
"""
import doctest
import io
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import DIY_LSTM
import fused_lstm
from conftest import REPO, use_cpu_matmul
from DIY_LSTM import lstm_layer, my_LSTM, my_LSTMCell
from model import DecoderRNN

# nn.LSTM says so on every call with proj_size > 0; it is not about my_LSTM
pytestmark = [pytest.mark.filterwarnings('ignore:LSTM with projections is not supported with oneDNN'),
              pytest.mark.usefixtures('one_thread')]

H_IN, H = 5, 7
LENGTHS = [4, 2, 5]  # unsorted on purpose: enforce_sorted=False has to reorder them
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def lstm_grads(m):
    """my_LSTM's parameter gradients under nn.LSTM's names and layout."""
    return {f'{name}_{suffix}': torch.cat([p.grad for p in params])
            for suffix, cell in m.cells.items() for name, params in cell.lstm_layout()}


def make_input(kind, batch_first, dtype=torch.float32, device='cpu', seed=0):
    """(input for the LSTM, leaf tensors that need a gradient, N)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, H_IN, generator=g, dtype=dtype).to(device).requires_grad_() for n in LENGTHS]
    if kind == 'packed_unsorted':
        return (lambda: pack_sequence(seqs, enforce_sorted=False)), seqs, len(seqs)
    if kind == 'packed_sorted':
        srt = sorted(seqs, key=len, reverse=True)
        return (lambda: pack_sequence(srt)), seqs, len(seqs)
    if kind == 'unbatched':
        x = seqs[0]
        return (lambda: x), [x], None
    x = torch.randn(4, 3, H_IN, generator=g, dtype=dtype).to(device)       # (L, N, H_in)
    x = (x.transpose(0, 1).contiguous() if batch_first else x).requires_grad_()
    return (lambda: x), [x], 3


def run_both(ref, m, make, leaves, hx):
    """Forward + backward with the same random loss through both; returns their results."""
    results = []
    for model in (ref, m):
        for t in leaves + list(hx or ()) + list(model.parameters()):
            t.grad = None
        out, (h_n, c_n) = model(make(), hx)
        data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
                   for t in (data, h_n, c_n))
        loss.backward()
        grads = [t.grad for t in leaves + list(hx or ())]
        results.append((out, data, h_n, c_n, grads))
    return results


CONFIGS = [dict(num_layers=nl, bidirectional=bd, proj_size=ps, bias=b)
           for nl, bd, ps, b in itertools.product([1, 3], [False, True], [0, 3], [True, False])]
INPUTS = ['dense', 'dense_batch_first', 'packed_sorted', 'packed_unsorted', 'unbatched']


@pytest.fixture(params=['mkl', 'onednn'])
def cpu_matmul(request, monkeypatch):
    """Run the test on each CPU matmul library the fused path can call (fused_lstm.CPU_MATMUL)."""
    use_cpu_matmul(request.param, monkeypatch)
    return request.param


@pytest.fixture
def path(lstm_path):
    """my_LSTM's fused argument for each path: the fused one on each CPU matmul library, the plain one."""
    return lstm_path == 'fused'


# for tests where no float32 CPU matmul runs (float64, half precision, the meta device, CUDA):
# CPU_MATMUL does not apply there, so each path runs once
FUSED = pytest.mark.parametrize('fused', [True, False], ids=['fused', 'plain'])


@pytest.mark.skipif(fused_lstm._ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available()
                    or not torch.backends.mkl.is_available(), reason='needs a torch build with oneDNN and MKL')
def test_cpu_matmul_auto_follows_the_vendor(monkeypatch):
    x = torch.zeros(2, 3)
    for vendor, expected in (('AuthenticAMD', 'onednn'), ('GenuineIntel', 'mkl'), ('', 'mkl')):
        monkeypatch.setattr(fused_lstm, '_CPU_VENDOR', vendor)
        assert fused_lstm.cpu_matmul(x) == expected, vendor
    assert fused_lstm.cpu_matmul(x.double()) == 'torch'           # float32 only
    monkeypatch.setattr(fused_lstm, 'CPU_MATMUL', 'blas')
    with pytest.raises(ValueError, match="LSTM_CPU_MATMUL in the environment. must be 'auto', 'mkl' or 'onednn', "
                                         "got 'blas'"):
        my_LSTM(H_IN, H)(torch.randn(3, 2, H_IN))


def test_cpu_matmul_from_the_environment():
    """LSTM_CPU_MATMUL picks the library for a whole run (a bench, or the test suite on another path)."""
    code = 'import fused_lstm; print(fused_lstm.CPU_MATMUL)'
    for value, expected in (('onednn', 'onednn'), (None, 'auto')):
        env = {k: v for k, v in os.environ.items() if k != 'LSTM_CPU_MATMUL'}
        env.update({'LSTM_CPU_MATMUL': value} if value else {})
        out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_cpu_matmuls_lists_what_each_choice_gives(monkeypatch):
    """cpu_matmuls() names the libraries that CPU_MATMUL really reaches (what lstm_path relies
    on), without touching CPU_MATMUL; the default ('auto') reaches one of them."""
    import fused_lstm
    before, x = fused_lstm.CPU_MATMUL, torch.zeros(1)
    found = fused_lstm.cpu_matmuls()
    assert fused_lstm.CPU_MATMUL == before
    assert fused_lstm.cpu_matmul(x, 'auto') in found or not found
    for lib in found:
        monkeypatch.setattr(fused_lstm, 'CPU_MATMUL', lib)
        assert fused_lstm.cpu_matmul(x) == lib
        assert fused_lstm.cpu_matmul(x.double()) == 'torch', 'float64 always takes torch.mm'


@pytest.mark.parametrize('with_hx', [False, True], ids=['no_hx', 'hx'])
@pytest.mark.parametrize('kind', INPUTS)
@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: '-'.join(f'{k}={int(v)}' for k, v in c.items()))
def test_matches_nn_lstm(cfg, kind, with_hx, path):
    torch.manual_seed(0)
    batch_first = kind == 'dense_batch_first'
    ref = nn.LSTM(H_IN, H, batch_first=batch_first, **cfg)
    m = my_LSTM.from_lstm(ref, fused=path)
    make, leaves, N = make_input(kind.replace('_batch_first', ''), batch_first)
    hx = None
    if with_hx:
        D = 2 if cfg['bidirectional'] else 1
        h_out = cfg['proj_size'] or H
        lead = (D * cfg['num_layers'],) + ((N,) if N else ())
        hx = (torch.randn(*lead, h_out, requires_grad=True), torch.randn(*lead, H, requires_grad=True))
    (o1, d1, h1, c1, g1), (o2, d2, h2, c2, g2) = run_both(ref, m, make, leaves, hx)
    close = dict(atol=1e-5, rtol=1e-5)
    assert d1.shape == d2.shape and h1.shape == h2.shape and c1.shape == c2.shape
    torch.testing.assert_close(d2, d1, **close)
    torch.testing.assert_close(h2, h1, **close)
    torch.testing.assert_close(c2, c1, **close)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, **close)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    my_grads = lstm_grads(m)
    assert sorted(my_grads) == sorted(ref_grads)
    for k in ref_grads:
        torch.testing.assert_close(my_grads[k], ref_grads[k], **close, msg=lambda s: f'{k}: {s}')
    if kind.startswith('packed'):
        for name in ('batch_sizes', 'sorted_indices', 'unsorted_indices'):
            a, b = getattr(o1, name), getattr(o2, name)
            assert (a is None and b is None) or torch.equal(a, b), name


def edge_input(kind):
    """(input maker, leaves, hx or None) for EDGES' inputs, with gradients wanted everywhere."""
    g = torch.Generator().manual_seed(0)
    if kind.startswith('packed_length_1'):
        seqs = [torch.randn(1, H_IN, generator=g).requires_grad_() for _ in range(3)]
        return (lambda: pack_sequence(seqs)), seqs, None
    shape = {'empty_batch': (4, 0, H_IN), 'one_step': (1, 3, H_IN), 'one_step_batch_1': (1, 1, H_IN),
             'batch_1': (6, 1, H_IN), 'non_contiguous': (6, 3, H_IN)}[kind.removesuffix('_hx')]
    x = torch.randn(*shape, generator=g)
    if kind == 'non_contiguous':
        x = x.repeat_interleave(2, -1)[..., ::2]                     # same values, strided
    x.requires_grad_()
    hx = None
    if kind.endswith('_hx'):
        hx = tuple(torch.randn(2, shape[1], n, generator=g).requires_grad_() for n in (3, H))
    return (lambda: x), [x], hx


# the edges where a matmul runs over zero rows (an empty batch; the backward's d W_hh over
# the steps after the first, of which a one-step sequence has none) or over odd layouts
EDGES = ['empty_batch', 'empty_batch_hx', 'one_step', 'one_step_hx', 'one_step_batch_1', 'batch_1',
         'packed_length_1', 'non_contiguous']


@pytest.mark.parametrize('kind', EDGES)
def test_edges_match_nn_lstm(kind, path):
    """Two layers with a projection (with hx: one bidirectional layer), forward and backward."""
    torch.manual_seed(0)
    cfg = dict(bidirectional=True, proj_size=3) if kind.endswith('_hx') else dict(num_layers=2, proj_size=3)
    ref = nn.LSTM(H_IN, H, **cfg)
    m = my_LSTM.from_lstm(ref, fused=path)
    make, leaves, hx = edge_input(kind)
    (_, d1, h1, c1, g1), (_, d2, h2, c2, g2) = run_both(ref, m, make, leaves, hx)
    for a, b in zip([d1, h1, c1] + g1, [d2, h2, c2] + g2):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for k, grad in lstm_grads(m).items():
        torch.testing.assert_close(grad, ref.get_parameter(k).grad, atol=1e-5, rtol=1e-5, msg=lambda s: f'{k}: {s}')


@FUSED
def test_float64_is_tighter(fused):
    torch.manual_seed(0)
    ref = nn.LSTM(H_IN, H, num_layers=2, bidirectional=True, proj_size=3).double()
    m = my_LSTM.from_lstm(ref, fused=fused)
    make, leaves, _ = make_input('packed_unsorted', False, dtype=torch.float64)
    (_, d1, h1, c1, g1), (_, d2, h2, c2, g2) = run_both(ref, m, make, leaves, None)
    for a, b in zip([d1, h1, c1] + g1, [d2, h2, c2] + g2):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    for k, g in lstm_grads(m).items():
        torch.testing.assert_close(g, ref.get_parameter(k).grad, atol=1e-12, rtol=1e-10)


@FUSED
def test_gradcheck_inputs_and_parameters(fused):
    torch.manual_seed(0)
    m = my_LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64, fused=fused)
    seqs = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (2, 3, 1)]
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)

    def inputs_fn(*args):
        out, (h, c) = m(pack_sequence(list(args[:3]), enforce_sorted=False), (args[3], args[4]))
        return out.data, h, c
    assert torch.autograd.gradcheck(inputs_fn, (*seqs, h0, c0))

    names = [k for k, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def params_fn(*ps):
        out, (h, c) = functional_call(m, dict(zip(names, ps)), (x,))
        return out, h, c
    # fast mode checks random directions: all ~500 parameters in a second, not in twenty
    # (functional_call's tensors are not the module's Parameters: the fused path concatenates them)
    assert torch.autograd.gradcheck(params_fn, params, fast_mode=True)

    def own_params_fn(*ps):   # the module's own Parameters, which the fused path reads in place
        out, (h, c) = m(x)
        return out, h, c
    assert torch.autograd.gradcheck(own_params_fn, list(m.parameters()), fast_mode=True)


@FUSED
def test_gradcheck_dense_bias_free(fused):
    torch.manual_seed(0)
    m = my_LSTM(3, 4, bias=False, batch_first=True, dtype=torch.float64, fused=fused)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x)[0], (x,))


def test_plain_path_has_gradients_of_gradients():
    torch.manual_seed(0)
    m = my_LSTM(3, 4, proj_size=2, dtype=torch.float64, fused=False)
    seqs = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (3, 1)]
    h0 = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)

    def fn(a, b, h, c):
        out, (h_n, c_n) = m(pack_sequence([a, b]), (h, c))
        return out.data, h_n, c_n
    assert torch.autograd.gradgradcheck(fn, (*seqs, h0, c0))


def test_fused_path_refuses_gradients_of_gradients():
    """create_graph=True through the hand-written backward raises, rather than giving zeros."""
    torch.manual_seed(0)
    m = my_LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = m(x)
    with pytest.raises(RuntimeError, match='fused=False'):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    # a gradient penalty on the plain path: its second derivative is there, and not zero
    m.fused = False
    out, _ = m(x)
    g, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    gg, = torch.autograd.grad(g.pow(2).sum(), x)
    assert gg.abs().sum() > 0


@pytest.mark.parametrize('proj_size', [0, 3])
def test_fused_layer_equals_per_gate_cell(proj_size, cpu_matmul):
    """fused_lstm.lstm_layer (flat weights, hand-written backward) == DIY_LSTM.lstm_layer ==
    my_LSTMCell step by step, outputs and every gradient."""
    torch.manual_seed(0)
    cell = my_LSTMCell(H_IN, H, proj_size=proj_size)
    h_out = proj_size or H
    x = torch.randn(6, 2, H_IN, requires_grad=True)                            # (L, N, H_in)
    h0 = torch.randn(2, h_out, requires_grad=True)
    c0 = torch.randn(2, H, requires_grad=True)
    results = []
    for layer in (fused_lstm.lstm_layer, lstm_layer):
        out, h_n, c_n = layer(cell, x.view(-1, H_IN), [2] * 6, h0, c0)
        grads = torch.autograd.grad((out.sin().sum() + h_n.sum() + c_n.cos().sum()),
                                    [x, h0, c0] + list(cell.parameters()))
        results.append((out, h_n, c_n) + grads)
    h, c = h0, c0
    steps = []
    for x_t in x:
        h, c = cell(x_t, (h, c))
        steps.append(h)
    torch.testing.assert_close(results[1][0].view(6, 2, h_out), torch.stack(steps))
    torch.testing.assert_close(results[1][1], h)
    torch.testing.assert_close(results[1][2], c)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(fused_lstm._MKL_LINEAR is None, reason='torch built without MKL')
@pytest.mark.parametrize('kind', ['dense', 'packed'])
def test_packed_gemm_steps_match_nn_lstm(kind, monkeypatch):
    """The forward's per-step matmul on MKL's packed W_hh (steps with the whole batch) and
    plain addmm_ (the shrinking steps of a packed batch) agree with nn.LSTM, gradients included."""
    monkeypatch.setattr(fused_lstm, 'CPU_MATMUL', 'mkl')
    rows = []
    mkl_linear = fused_lstm._MKL_LINEAR
    monkeypatch.setattr(fused_lstm, '_MKL_LINEAR', lambda x, *args: rows.append(x.size(0)) or mkl_linear(x, *args))
    torch.manual_seed(0)
    ref = nn.LSTM(H_IN, H, batch_first=True)
    m = my_LSTM.from_lstm(ref)
    lengths = [9, 7, 6, 6]                       # batch_sizes 4 x 6, then 2, 1, 1
    x = torch.randn(4, 9, H_IN, requires_grad=True)
    make = (lambda: pack_padded_sequence(x, lengths, batch_first=True)) if kind == 'packed' else (lambda: x)
    outs = {}
    for name, model in (('ref', ref), ('mine', m)):
        x.grad = None
        out, (h, c) = model(make())
        out = out.data if kind == 'packed' else out
        (out.pow(2).sum() + h.sum() + c.sum()).backward()
        outs[name] = (out, h, c, x.grad.clone(), lstm_grads(m) if name == 'mine' else
                      {k: p.grad for k, p in ref.named_parameters()})
    expected = [4] * (5 if kind == 'packed' else 8)  # every step but the first (no h yet) with all 4 rows
    assert rows == expected, rows
    for a, b in zip(outs['ref'][:4], outs['mine'][:4]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for k, g in outs['ref'][4].items():
        torch.testing.assert_close(outs['mine'][4][k], g, atol=1e-5, rtol=1e-5)


def test_cell_matches_nn_lstmcell():
    torch.manual_seed(0)
    ref = nn.LSTMCell(H_IN, H)
    cell = my_LSTMCell(H_IN, H)
    cell.load_state_dict(ref.state_dict())
    x, hx = torch.randn(3, H_IN), (torch.randn(3, H), torch.randn(3, H))
    for a, b in zip(ref(x, hx), cell(x, hx)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    for a, b in zip(ref(x[0]), cell(x[0])):                                   # unbatched, no state
        assert b.shape == (H,)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('bias', [True, False])
def test_cell_state_dict_is_nn_lstmcells(bias):
    """my_LSTMCell and nn.LSTMCell load each other's state dicts, strictly; per-gate keys load too."""
    torch.manual_seed(0)
    ref, cell = nn.LSTMCell(H_IN, H, bias=bias), my_LSTMCell(H_IN, H, bias=bias)
    cell.load_state_dict(ref.state_dict())
    x, hx = torch.randn(3, H_IN), (torch.randn(3, H), torch.randn(3, H))
    torch.testing.assert_close(cell(x, hx)[0], ref(x, hx)[0], atol=1e-6, rtol=1e-5)
    other = nn.LSTMCell(H_IN, H, bias=bias)
    other.load_state_dict(my_LSTMCell(H_IN, H, bias=bias).state_dict())
    assert list(cell.state_dict()) == list(ref.state_dict())
    per_gate = {f'{name}.{p}': t for name, m in cell.named_children() for p, t in m.state_dict().items()}
    assert 'fc_ig.weight' in per_gate
    fresh = my_LSTMCell(H_IN, H, bias=bias)
    fresh.load_state_dict(per_gate)
    torch.testing.assert_close(fresh(x, hx)[0], ref(x, hx)[0], atol=1e-6, rtol=1e-5)


def test_gate_log_records_each_step():
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H, batch_first=True, fused=False)
    m.cells.l0.gate_log = log = []
    x = torch.randn(2, 4, H_IN)
    out, (h, c) = m(x)
    assert len(log) == 4 and sorted(log[0]) == ['c', 'f', 'g', 'h', 'i', 'o']
    assert all(t.shape == (2, H) and not t.requires_grad for step in log for t in step.values())
    torch.testing.assert_close(torch.stack([s['h'] for s in log], 1), out)
    torch.testing.assert_close(log[-1]['c'], c[0])
    i, f, g, o = (log[0][k] for k in 'ifgo')
    assert (0 < i).all() and (i < 1).all() and (g.abs() < 1).all()
    torch.testing.assert_close(log[0]['c'], i * g)                   # c' = f * 0 + i * g
    torch.testing.assert_close(log[0]['h'], o * torch.tanh(i * g))
    m.cells.l0.gate_log = None
    m(x)
    assert len(log) == 4


def test_greedy_single_steps_equal_one_call(path):
    """DecoderRNN.sample feeds (N, 1, E) steps and carries the state, under no_grad."""
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H, num_layers=2, batch_first=True, fused=path)
    x = torch.randn(1, 6, H_IN)
    with torch.no_grad():
        full, (h_full, c_full) = m(x)
        states, steps = None, []
        for t in range(6):
            out, states = m(x[:, t:t + 1], states)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    torch.testing.assert_close(states[0], h_full)
    torch.testing.assert_close(states[1], c_full)


def _update(how, m, x):
    """Change m's weights the way `how` says."""
    if how in ('fused_adam', 'foreach_adam', 'sgd'):
        opt = (torch.optim.SGD(m.parameters(), lr=0.5) if how == 'sgd' else
               torch.optim.Adam(m.parameters(), lr=0.1, **{how.split('_')[0]: True}))
        m(x)[0].pow(2).sum().backward()
        opt.step()                       # fused and foreach Adam do not bump version counters
    elif how == 'data_assign':
        w = m.cells.l0.fc_hg.weight
        w.data = torch.randn_like(w)
    elif how == 'data_copy':
        m.cells.l0.fc_ii.weight.data.copy_(torch.randn(H, H_IN))
    elif how == 'load_state_dict':
        m.load_state_dict(my_LSTM(H_IN, H).state_dict())
    elif how == 'new_parameter':
        m.cells.l0.fc_ho.weight = nn.Parameter(torch.randn(H, H))
    elif how == 'new_linear':
        m.cells.l0.fc_if = nn.Linear(H_IN, H)
    elif how == 'to':
        m.double().float()               # new tensors behind the same parameters, then updated in place
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)


@pytest.mark.parametrize('how', ['fused_adam', 'foreach_adam', 'sgd', 'data_assign', 'data_copy',
                                 'load_state_dict', 'new_parameter', 'new_linear', 'to'])
def test_no_grad_forward_sees_every_weight_update(how, cpu_matmul):
    """The fused path reads the parameters' own memory: never yesterday's weights."""
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H)
    x = torch.randn(3, 2, H_IN)
    step = x[:1]                                   # one step from a state: the greedy path
    state = (torch.randn(1, 2, H), torch.randn(1, 2, H))
    with torch.no_grad():
        before = m(x)[0], m(step, state)[0]
    _update(how, m, x)
    ref = m.to_lstm()
    with torch.no_grad():
        after = m(x)[0], m(step, state)[0]
        expected = ref(x)[0], ref(step, state)[0]
    for a, b, e in zip(before, after, expected):
        assert not torch.allclose(a, b)
        torch.testing.assert_close(b, e, atol=1e-5, rtol=1e-5)
    # and training goes on from the new values, into the parameters the optimizer holds
    m.zero_grad(set_to_none=True)
    m(x)[0].sum().backward()
    ref(x)[0].sum().backward()
    for k, g in lstm_grads(m).items():
        torch.testing.assert_close(g, ref.get_parameter(k).grad, atol=1e-5, rtol=1e-5)


def test_decoder_trained_with_fused_adam_decodes_like_the_plain_path(cpu_matmul):
    """Train a tiny DecoderRNN with fused Adam, decode greedily under no_grad between steps:
    the fused path's tokens and states are the plain path's (stale weights would differ)."""
    torch.manual_seed(0)
    decoder = DecoderRNN(8, 16, vocab_size=12, num_layers=1, max_seq_length=6)
    opt = torch.optim.Adam(decoder.parameters(), lr=0.05, fused=True)
    features = torch.randn(4, 8)
    captions = torch.randint(0, 12, (4, 5))
    lengths = [5, 4, 4, 2]
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    seen = set()
    for step in range(4):
        decoder.train()
        loss = nn.functional.cross_entropy(decoder(features, captions, lengths), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decoder.eval()
        decoded = {}
        for fused in (True, False):
            decoder.lstm.fused = fused
            with torch.no_grad():
                hiddens, _ = decoder.lstm(features.unsqueeze(1), None)
                decoded[fused] = (decoder.sample(features), hiddens)
        decoder.lstm.fused = True
        assert torch.equal(decoded[True][0], decoded[False][0]), step
        torch.testing.assert_close(decoded[True][1], decoded[False][1])
        seen.add(tuple(decoded[True][0].flatten().tolist()))
    assert len(seen) > 1                           # training did change what it says


def test_dropout_only_in_training(path):
    torch.manual_seed(0)
    ref = nn.LSTM(H_IN, H, num_layers=3, dropout=1.0)
    m = my_LSTM.from_lstm(ref, fused=path)
    x = torch.randn(4, 2, H_IN)
    # p = 1 zeroes every layer's output but the last: deterministic, so comparable
    for mode in (True, False):
        ref.train(mode), m.train(mode)
        torch.testing.assert_close(m(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    m = my_LSTM(H_IN, H, num_layers=2, dropout=0.5, fused=path)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    a, b = m(x)[0], m(x)[0]
    assert not torch.allclose(a, b)                # a fresh mask each call
    m1 = my_LSTM(H_IN, H, num_layers=1)
    with pytest.warns(UserWarning, match='num_layers greater than 1'):
        my_LSTM(H_IN, H, num_layers=1, dropout=0.5)
    m1.train()
    torch.testing.assert_close(m1(x)[0], m1(x)[0])  # nothing to drop with one layer


@pytest.mark.parametrize('cls', [nn.LSTM, my_LSTM])
@pytest.mark.parametrize('kwargs, match', [
    (dict(dropout=-0.1), 'dropout'), (dict(dropout=1.5), 'dropout'), (dict(dropout='0.5'), 'dropout'),
    (dict(proj_size=H), 'proj_size'), (dict(proj_size=-1), 'proj_size'),
    (dict(hidden_size=0, proj_size=0), 'hidden_size'), (dict(num_layers=0), 'num_layers'),
])
def test_bad_arguments_raise_value_error(cls, kwargs, match):
    args = dict(input_size=H_IN, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cls(**args)


def test_bad_sizes_name_what_came():
    with pytest.raises(ValueError, match='input_size=0'):
        my_LSTM(0, H)
    with pytest.raises(ValueError, match='proj_size=7 and hidden_size=7'):
        my_LSTM(H_IN, H, proj_size=7)
    with pytest.raises(TypeError, match='hidden_size should be of type int, got: float'):
        my_LSTM(H_IN, 7.0)


@pytest.mark.parametrize('cls', [nn.LSTM, my_LSTM])
def test_bad_inputs(cls):
    m = cls(H_IN, H, num_layers=2)
    with pytest.raises(ValueError, match='Expected input to be 2D or 3D, got 4D instead'):
        m(torch.randn(2, 3, 4, H_IN))
    with pytest.raises(ValueError, match='2D or 3D, got 1D'):
        m(torch.randn(H_IN))
    with pytest.raises(RuntimeError, match=f'input.size\\(-1\\) must be equal to input_size. Expected {H_IN}, got 4'):
        m(torch.randn(3, 2, 4))
    x = torch.randn(3, 2, H_IN)
    with pytest.raises(RuntimeError, match=r'Expected hidden\[0\] size \(2, 2, 7\), got \[1, 2, 7\]'):
        m(x, (torch.zeros(1, 2, H), torch.zeros(2, 2, H)))
    with pytest.raises(RuntimeError, match=r'Expected hidden\[1\] size \(2, 2, 7\), got \[2, 2, 6\]'):
        m(x, (torch.zeros(2, 2, H), torch.zeros(2, 2, 6)))
    with pytest.raises(RuntimeError, match='should also be 3-D but got \\(2-D, 2-D\\)'):
        m(x, (torch.zeros(2, H), torch.zeros(2, H)))
    with pytest.raises(RuntimeError, match='should also be 2-D but got \\(3-D, 3-D\\)'):
        m(x[:, 0], (torch.zeros(2, 1, H), torch.zeros(2, 1, H)))


@pytest.mark.parametrize('cls', [nn.LSTMCell, my_LSTMCell])
def test_bad_cell_inputs(cls):
    """nn.LSTMCell's exception types and messages (those of PyTorch's own error inputs)."""
    cell = cls(H_IN, H)
    with pytest.raises(ValueError, match='Expected input to be 1D or 2D, got 3D instead'):
        cell(torch.randn(1, 2, H_IN))
    with pytest.raises(RuntimeError, match='input has inconsistent input_size: got 4 expected 5'):
        cell(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match='hidden1 has inconsistent hidden_size: got 6, expected 7'):
        cell(torch.randn(2, H_IN), (torch.zeros(2, H), torch.zeros(2, 6)))
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden0 batch size 3"):
        cell(torch.randn(2, H_IN), (torch.zeros(3, H), torch.zeros(3, H)))
    with pytest.raises(ValueError, match=r'Expected hx\[0\] to be 1D or 2D, got 4D instead'):
        cell(torch.randn(2, H_IN), (torch.zeros(2, 1, 1, H), torch.zeros(2, 1, 1, H)))


@pytest.mark.parametrize('fused', [None, True, False], ids=['nn.LSTM', 'fused', 'plain'])
def test_errors_of_nn_lstms_type(fused):
    """The exception types nn.LSTM raises in this torch version, on both paths."""
    cls = nn.LSTM if fused is None else (lambda *a, **k: my_LSTM(*a, **k, fused=fused))
    m = cls(H_IN, H)
    with pytest.raises(ValueError, match=r'RNN input dtype \(torch.float64\) does not match weight dtype '
                                         r'\(torch.float32\). Convert input: input.to\(torch.float32\)'):
        m(torch.randn(3, 2, H_IN, dtype=torch.float64))
    with pytest.raises(RuntimeError):              # nn.LSTM checks only dense input's dtype
        m(pack_sequence([torch.randn(3, H_IN, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match='Expected sequence length to be larger than 0'):
        m(torch.randn(0, 2, H_IN))
    with pytest.raises(RuntimeError, match='Expected sequence length to be larger than 0'):
        m(torch.randn(0, H_IN))
    out, (h, c) = m(torch.randn(3, 0, H_IN))       # an empty batch is fine
    assert out.shape == (3, 0, H) and h.shape == c.shape == (1, 0, H)
    for kwargs in (dict(num_layers=2.0), dict(num_layers='2'), dict(bias=1), dict(bias='True'),
                   dict(batch_first=0), dict(input_size=3.0)):
        args = {'input_size': H_IN, 'hidden_size': H, **kwargs}
        with pytest.raises(TypeError):
            cls(**args)


@FUSED
def test_meta_device(fused):
    """Built on the meta device (shapes only), then materialised with to_empty."""
    m = my_LSTM(H_IN, H, num_layers=2, proj_size=3, device='meta', fused=fused)
    assert all(p.is_meta for p in m.parameters())
    out, (h, c) = m(torch.randn(4, 2, H_IN, device='meta'))
    assert out.shape == (4, 2, 3) and h.shape == (2, 2, 3) and c.shape == (2, 2, H)
    m.to_empty(device='cpu')
    m.reset_parameters()
    x = torch.randn(4, 2, H_IN)
    torch.testing.assert_close(m(x)[0], m.to_lstm()(x)[0], atol=1e-6, rtol=1e-5)


def test_packed_hx_shape_checked():
    m = my_LSTM(H_IN, H)
    packed = pack_sequence([torch.randn(3, H_IN), torch.randn(2, H_IN)])
    with pytest.raises(RuntimeError, match=r'Expected hidden\[0\] size \(1, 2, 7\), got \[1, 3, 7\]'):
        m(packed, (torch.zeros(1, 3, H), torch.zeros(1, 3, H)))


def test_state_dict_exchange_both_ways(tmp_path):
    torch.manual_seed(0)
    ref = nn.LSTM(H_IN, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    x = torch.randn(2, 4, H_IN)
    # nn.LSTM -> my_LSTM, through load_state_dict with nn.LSTM's keys (strict)
    m = my_LSTM(H_IN, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    m.load_state_dict(ref.state_dict())
    torch.testing.assert_close(m(x)[0], ref(x)[0], atol=1e-6, rtol=1e-5)
    # my_LSTM's state dict is nn.LSTM's, key for key, so nn.LSTM loads it (strict)
    assert list(m.state_dict()) == list(ref.state_dict())
    other = nn.LSTM(H_IN, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    other.load_state_dict(m.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
        assert torch.equal(m.state_dict()[k], v), k
    # my_LSTM -> nn.LSTM by to_lstm
    back = m.to_lstm()
    assert isinstance(back, nn.LSTM) and back.batch_first and back.proj_size == 3
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the per-gate keys (cells.l0.fc_ii.weight, ...) still load, strictly
    per_gate = {k: p.detach().clone() for k, p in m.named_parameters()}
    assert 'cells.l1_reverse.fc_hr.weight' in per_gate and 'cells.l0.fc_ig.bias' in per_gate
    m_old = my_LSTM(H_IN, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    m_old.load_state_dict(per_gate)
    torch.testing.assert_close(m_old(x)[0], ref(x)[0], atol=1e-6, rtol=1e-5)
    # its own state dict, through a file, with the safe loader
    path = tmp_path / 'lstm.pt'
    torch.save(m.state_dict(), path)
    m2 = my_LSTM(H_IN, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    m2.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(m2(x)[0], m(x)[0])
    # the whole module pickles like any other
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    torch.testing.assert_close(m3(x)[0], m(x)[0])


def test_tutorial_decoder_checkpoint_loads_into_my_lstm_decoder():
    """A decoder state dict saved with nn.LSTM ('lstm.weight_ih_l0', ...) loads strictly."""
    class Decoder(nn.Module):
        def __init__(self, lstm_cls):
            super().__init__()
            self.embed = nn.Embedding(10, H_IN)
            self.lstm = lstm_cls(H_IN, H, 1, batch_first=True)
            self.linear = nn.Linear(H, 10)

    torch.manual_seed(0)
    tutorial = Decoder(nn.LSTM)
    sd = tutorial.state_dict()
    assert 'lstm.weight_ih_l0' in sd and 'lstm.bias_hh_l0' in sd
    mine = Decoder(my_LSTM)
    result = mine.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, H_IN)
    torch.testing.assert_close(mine.lstm(x)[0], tutorial.lstm(x)[0], atol=1e-6, rtol=1e-5)
    mine.load_state_dict(mine.state_dict())        # and its own keys still load
    sd.pop('lstm.bias_hh_l0')
    with pytest.raises(RuntimeError, match='Missing key'):
        mine.load_state_dict(sd)


def test_from_lstm_keeps_mode_device_dtype():
    ref = nn.LSTM(H_IN, H, num_layers=2, dropout=0.3).double().eval()
    m = my_LSTM.from_lstm(ref)
    assert not m.training and m.dropout == 0.3 and m.num_layers == 2
    assert all(p.dtype == torch.float64 for p in m.parameters())


def test_initialisation_like_nn_lstm():
    torch.manual_seed(0)
    m = my_LSTM(H_IN, 100, num_layers=2, proj_size=10)
    k = 100 ** -0.5
    values = torch.cat([p.flatten() for p in m.parameters()])
    assert values.abs().max() <= k and values.abs().max() > 0.95 * k
    assert abs(values.mean()) < 0.05 * k                        # uniform, centred
    assert m.cells.l0.fc_hi.weight.shape == (100, 10)           # hidden side reads the projected h
    assert m.cells.l1.fc_ii.weight.shape == (100, 10)


@FUSED
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype, fused):
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H, num_layers=2, batch_first=True)
    x = torch.randn(3, 4, H_IN)
    ref_out = m(x)[0]
    m_half = my_LSTM.from_lstm(m.to_lstm(), fused=fused).to(dtype)
    out, (h, c) = m_half(x.to(dtype))
    assert out.dtype == h.dtype == c.dtype == dtype
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in m_half.parameters())


def test_doc_examples():
    failures, tried = doctest.testmod(DIY_LSTM, extraglobs={'torch': torch})
    assert tried > 0 and failures == 0


@CUDA
@FUSED
@pytest.mark.parametrize('kind', ['dense', 'packed_unsorted'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_cuda_matches_nn_lstm(kind, dtype, fused):
    torch.manual_seed(0)
    ref = nn.LSTM(H_IN, H, num_layers=2, bidirectional=True).cuda().to(dtype)
    m = my_LSTM.from_lstm(ref, fused=fused)
    make, leaves, _ = make_input(kind, False, dtype=dtype, device='cuda')
    (_, d1, h1, c1, g1), (_, d2, h2, c2, g2) = run_both(ref, m, make, leaves, None)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.backends.cuda.matmul.allow_tf32 = False
    for a, b in zip([d1, h1, c1] + g1, [d2, h2, c2] + g2):
        torch.testing.assert_close(b, a, **tol)


@CUDA
def test_cuda_module_moves():
    m = my_LSTM(H_IN, H).cuda()
    x = torch.randn(3, 2, H_IN)
    with torch.no_grad():
        out, (h, c) = m(x.cuda())
    assert out.is_cuda and h.is_cuda
    torch.testing.assert_close(out.cpu(), m.to_lstm()(x.cuda())[0].cpu(), atol=1e-5, rtol=1e-5)
    m.cpu()
    with torch.no_grad():
        out = m(x)[0]
    assert not out.is_cuda
    torch.testing.assert_close(out, m.to_lstm()(x)[0], atol=1e-5, rtol=1e-5)


def test_pad_packed_roundtrip_lengths(cpu_matmul):
    """The packed output unpacks to the caller's order, zeros past each length."""
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H, batch_first=True)
    seqs = [torch.randn(n, H_IN) for n in LENGTHS]
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    out, (h, _) = m(pack_padded_sequence(padded, LENGTHS, batch_first=True, enforce_sorted=False))
    unpacked, lengths = pad_packed_sequence(out, batch_first=True)
    assert lengths.tolist() == LENGTHS
    for b, n in enumerate(LENGTHS):
        alone, (h_alone, _) = m(seqs[b].unsqueeze(0))
        torch.testing.assert_close(unpacked[b, :n], alone[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(h[0, b], h_alone[0, 0], atol=1e-6, rtol=1e-5)
        assert (unpacked[b, n:] == 0).all()


@FUSED
def test_autocast_bf16_runs_in_bf16_and_trains_float32_weights(fused):
    """Under autocast (train.py --amp bf16) the layer runs in bf16, as autocast runs cuDNN's LSTM."""
    torch.manual_seed(0)
    m = my_LSTM(8, 16, batch_first=True, fused=fused)
    x = torch.randn(3, 5, 8)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2], batch_first=True)
    ref, (h_ref, _) = m(packed)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, (h, c) = m(packed)
    assert out.data.dtype == h.dtype == c.dtype == torch.bfloat16
    torch.testing.assert_close(out.data.float(), ref.data, atol=2e-2, rtol=2e-2)
    out.data.float().sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_eval_switch_after_fused_adam(cpu_matmul):
    """Fused Adam updates weights without bumping version counters; eval() must still see them."""
    torch.manual_seed(0)
    m = my_LSTM(4, 8)
    x = torch.randn(3, 2, 4)
    m.eval()
    with torch.no_grad():
        before = m(x)[0]
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    m(x)[0].sum().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        after = m(x)[0]
    torch.testing.assert_close(after, m.to_lstm()(x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_fused_switch(cpu_matmul):
    """fused is an argument and an attribute, shown by repr when off, not kept in the state dict."""
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H, num_layers=2, bidirectional=True)
    assert m.fused and 'fused' not in repr(m)
    x = torch.randn(4, 3, H_IN, requires_grad=True)
    out_fused = m(x)[0]
    m.fused = False
    assert 'fused=False' in m.extra_repr()
    out_plain = m(x)[0]
    torch.testing.assert_close(out_plain, out_fused, atol=1e-6, rtol=1e-5)
    assert not any('fused' in k for k in m.state_dict())
    assert my_LSTM(H_IN, H, fused=False).fused is False
    plain = my_LSTM(H_IN, H, num_layers=2, bidirectional=True, fused=False)
    plain.load_state_dict(m.state_dict())
    assert plain.fused is False


def test_per_gate_weight_norm_on_both_paths(cpu_matmul):
    """What nn.LSTM does by name (weight_norm(lstm, 'weight_hh_l0')) is done per gate here."""
    torch.manual_seed(0)
    m = my_LSTM(H_IN, H)
    for gate in ('fc_hi', 'fc_hf', 'fc_hg', 'fc_ho'):
        nn.utils.parametrizations.weight_norm(getattr(m.cells.l0, gate))
    x = torch.randn(3, 2, H_IN)
    out_fused = m(x)[0]
    m.fused = False
    torch.testing.assert_close(m(x)[0], out_fused, atol=1e-6, rtol=1e-5)
    sd = m.state_dict()                            # the parametrized gates keep their own keys
    assert 'weight_ih_l0' in sd and 'cells.l0.fc_hi.parametrizations.weight.original0' in sd
    m2 = my_LSTM(H_IN, H)
    for gate in ('fc_hi', 'fc_hf', 'fc_hg', 'fc_ho'):
        nn.utils.parametrizations.weight_norm(getattr(m2.cells.l0, gate))
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2(x)[0], out_fused, atol=1e-6, rtol=1e-5)
