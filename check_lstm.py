"""Check students' DIY_LSTM.py files against nn.LSTM, whatever they named their weights.

    $ python check_lstm.py submissions/alice submissions/bob/DIY_LSTM.py

Each PATH is a DIY_LSTM.py (any file name) or a folder holding one. Each file is imported in
a process of its own, with a time limit, so a crash or a hang only ends its own checks. The
file must define my_LSTM(input_size, hidden_size, num_layers, batch_first=True), whose
forward(input, hx=None) returns output, (h_n, c_n) as nn.LSTM's does, as DecoderRNN calls it.

The checker never reads parameter names to understand them. It finds the weights by their
shapes (the probe's input size, 6, differs from its hidden size, 4, so the two sides cannot
be confused), then finds which gate each block of rows is by trying every assignment against
nn.LSTM on a probe input: one nn.Linear per gate and side, one nn.Linear(H_in, 4*H) per side
with the gates in any order (cs231n's is i, f, o, g), a single Linear on [x, h], or plain
nn.Parameter tensors, used as x @ W or W @ x. An assignment that reproduces one of the classic
bugs (tanh on a gate that needs a sigmoid, two gates swapped, a gate without bias, batch_first
ignored) names it. Then, one line each: the forward (dense, 1 and 2 layers), PackedSequence
input (sorted and not), a given hx, the gradients, whether the lab's DecoderRNN trains with it,
and its speed next to nn.LSTM's (for information, never a failure).

Exit code: 0 when every submission passes every correctness check, 1 when one fails, 2 on a
usage error.
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from utils import HelpFormatter, fail

GATES = 'ifgo'  # nn.LSTM's order of the gates' rows in weight_ih_l[k]: (W_ii|W_if|W_ig|W_io)
GATE_NAMES = {'i': 'input gate i', 'f': 'forget gate f', 'g': 'cell candidate g', 'o': 'output gate o'}
# Probe sizes. I differs from H, 2H, 4H and I + H, so a weight's shape says which side it reads.
I, H = 6, 4
N, L = 3, 5  # N != L, so input read as (L, N, I) when it is (N, L, I) shows
TOL = 1e-4   # float32, a few steps: a right LSTM lands within ~1e-6, a wrong one at ~1e-1
WORKER_ENV = 'CHECK_LSTM_WORKER'


# --------------------------------------------------------------------------------------
# The reference: nn.LSTM, and the classic bugs as LSTMs of their own
# --------------------------------------------------------------------------------------

class Variant:
    """An LSTM as a submission may compute it: each gate's activation (acts: 's' sigmoid or
    't' tanh, for i, f, g, o), h = o * tanh(c) or o * c, and whether batch_first is honoured.
    Gates without bias are set in the weights (zero rows), not here."""

    def __init__(self, acts='ssts', cell_tanh=True, batch_first=True):
        self.acts, self.cell_tanh, self.batch_first = acts, cell_tanh, batch_first

    @property
    def is_lstm(self):
        return self.acts == 'ssts' and self.cell_tanh

    def bugs(self):
        out = []
        wrong = [k for k, a in zip(GATES, self.acts) if a != 'ssts'[GATES.index(k)]]
        if wrong in (['f', 'g'], ['g', 'o']):
            k = wrong[0] if wrong[0] != 'g' else wrong[1]
            out.append(f"gates {k} and g swapped: tanh on the {GATE_NAMES[k]}, a sigmoid on the candidate g")
        else:
            out += [f"tanh on the {GATE_NAMES[k]}, which needs a sigmoid" if k != 'g'
                    else "a sigmoid on the cell candidate g, which needs tanh" for k in wrong]
        if not self.cell_tanh:
            out.append("h = o * c: the tanh of the cell state is missing")
        if not self.batch_first:
            out.append("batch_first ignored: it reads (N, L, H_in) input as (L, N, H_in)")
        return out


# the LSTM first, then the bugs a submission may have; 'ssts' with the gates renamed is the
# LSTM again (i*g is symmetric, so swapping i and g is no bug), hence only f<->g and g<->o
ACTS = ['ssts', 'tsts', 'stts', 'sstt', 'ssss', 'stss', 'ssst']
VARIANTS = ([Variant(a) for a in ACTS] + [Variant('ssts', cell_tanh=False)]
            + [Variant(a, batch_first=False) for a in ACTS] + [Variant('ssts', False, False)])


def gate_rows(t, gates):
    """The rows of nn.LSTM tensor t (4H, ...) or (4H,) of the given gates, in that order."""
    return torch.cat([t[GATES.index(k) * H:(GATES.index(k) + 1) * H] for k in gates])


def random_weights(num_layers, gen, hidden=True, bias=True, no_bias=''):
    """nn.LSTM's parameters by its names; W_hh and the biases zero unless asked for. Gates in
    no_bias get zero bias rows (a submission whose gate has no bias computes that)."""
    w = {}
    for k in range(num_layers):
        size = I if k == 0 else H
        w[f'weight_ih_l{k}'] = torch.randn(4 * H, size, generator=gen) * 0.6
        w[f'weight_hh_l{k}'] = torch.randn(4 * H, H, generator=gen) * 0.6 * hidden
        for name in ('bias_ih', 'bias_hh'):
            b = torch.randn(4 * H, generator=gen) * 0.6 * bias
            for g in no_bias:
                b[GATES.index(g) * H:(GATES.index(g) + 1) * H] = 0
            w[f'{name}_l{k}'] = b
    return w


def reference(weights, input, hx, variant, num_layers):
    """output, (h_n, c_n) of the LSTM `variant` with nn.LSTM-named `weights`, for the input as
    nn.LSTM(batch_first=True) takes it (dense or PackedSequence). The LSTM itself is nn.LSTM."""
    if variant.is_lstm:
        lstm = nn.LSTM(I, H, num_layers, batch_first=variant.batch_first)
        return torch.func.functional_call(lstm, weights, (input, hx))
    act = {'s': torch.sigmoid, 't': torch.tanh}
    packed = isinstance(input, PackedSequence)
    if packed:
        x, lengths = pad_packed_sequence(input, batch_first=True)       # (N, L, I), caller's order
    else:
        x = input if variant.batch_first else input.transpose(0, 1)     # (N, L, I)
        lengths = torch.full((x.size(0),), x.size(1))
    n, steps = x.shape[:2]
    running = torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)   # (N, L)
    h_n, c_n = [], []
    for k in range(num_layers):
        w_ih, w_hh, b_ih, b_hh = (weights[f'{p}_l{k}'] for p in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'))
        h = hx[0][k] if hx is not None else x.new_zeros(n, H)
        c = hx[1][k] if hx is not None else x.new_zeros(n, H)
        outs = []
        for t in range(steps):
            a = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh                # (N, 4H)
            i, f, g, o = (act[fn](z) for fn, z in zip(variant.acts, a.chunk(4, 1)))
            c_new = f * c + i * g
            h_new = o * (torch.tanh(c_new) if variant.cell_tanh else c_new)
            keep = running[:, t:t + 1]                                  # (N, 1) sequences still running
            h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            outs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        x = torch.stack(outs, 1)                                        # (N, L, H)
        h_n.append(h)
        c_n.append(c)
    if packed:
        out = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    else:
        out = x if variant.batch_first else x.transpose(0, 1)
    return out, (torch.stack(h_n), torch.stack(c_n))


def padded(out):
    """A forward's output as a dense (N, L, .) tensor: PackedSequence unpacked (zeros after
    each sequence's end, the caller's order), a tensor as it is."""
    return pad_packed_sequence(out, batch_first=True)[0] if isinstance(out, PackedSequence) else out


def diff(a, b):
    """max |a - b|, inf when the shapes differ or a is no tensor."""
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return float('inf')
    return (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0


class CheckError(Exception):
    """A check's failure, with the line that explains it."""


def unpack(result):
    """(output, h_n, c_n) from what forward returned, or CheckError saying what it returned."""
    if (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], (tuple, list))
            and len(result[1]) == 2):
        return result[0], result[1][0], result[1][1]
    raise CheckError(f"forward returned {describe_value(result)}; nn.LSTM returns output, (h_n, c_n)")


def describe_value(v):
    if isinstance(v, torch.Tensor):
        return f'a tensor of shape {tuple(v.shape)}'
    if isinstance(v, (tuple, list)):
        return f'a {type(v).__name__} of {len(v)}: ({", ".join(describe_value(x) for x in v)})'
    return type(v).__name__


# --------------------------------------------------------------------------------------
# Finding the weights: slots by shape, then gates by trial
# --------------------------------------------------------------------------------------

class Slot:
    """One parameter of the submission and the nn.LSTM block it holds.

    A weight slot (2-D) holds rows `gates` of W_ih (side 'x'), of W_hh ('h'), or of both side
    by side ('xh' for a Linear on [x, h], 'hx' on [h, x]), transposed when the module uses it
    as x @ W. A bias slot (1-D) holds rows `gates` of a bias; `parts` says which, per gate:
    'ih', 'hh', 'sum' (b_ih + b_hh, when it is the gate's only bias) or 'zero' (a third one).
    """

    def __init__(self, name, param, kind, options=None, size=0):
        self.name, self.param, self.kind = name, param, kind
        self.options = options or []  # weights: [(side, transposed), ...] the shape allows
        self.size = size              # how many gates' rows it holds
        self.layer, self.side, self.transposed, self.gates, self.parts = 0, None, False, None, None

    def role(self):
        return self.side, self.transposed, self.gates, self.parts

    def set_role(self, role):
        self.side, self.transposed, self.gates, self.parts = role


def find_slots(module, input_size, hidden_size):
    """The submission's parameters as Slots, by shape; raises CheckError for one that fits no
    LSTM role. An nn.Linear's weight is used as W @ x; a bare 2-D parameter may be either way."""
    owner = {}
    for mname, m in module.named_modules():
        if isinstance(m, nn.Linear):
            owner[id(m.weight)] = 'linear'
    slots = []
    for name, p in module.named_parameters():
        if p.dim() == 1:
            if p.numel() % hidden_size or not 1 <= p.numel() // hidden_size <= 4:
                raise CheckError(f"parameter {name} of shape {tuple(p.shape)} fits no LSTM bias "
                                 f"(hidden_size {hidden_size}: a bias has H, 2H or 4H entries)")
            slots.append(Slot(name, p, 'b', size=p.numel() // hidden_size))
            continue
        if p.dim() != 2:
            raise CheckError(f"parameter {name} of shape {tuple(p.shape)}: only 1-D and 2-D weights can be matched")
        orientations = [(p.shape[0], p.shape[1], False)]
        if owner.get(id(p)) != 'linear':
            orientations.append((p.shape[1], p.shape[0], True))
        sides = {input_size: ['x'], hidden_size: ['h'], input_size + hidden_size: ['xh', 'hx']}
        if input_size == hidden_size:
            sides = {hidden_size: ['x', 'h'], 2 * hidden_size: ['xh', 'hx']}
        options, size = [], 0
        for out, inp, transposed in orientations:
            if out % hidden_size == 0 and 1 <= out // hidden_size <= 4 and inp in sides:
                options += [(side, transposed) for side in sides[inp]]
                size = out // hidden_size
        if not options:
            raise CheckError(f"parameter {name} of shape {tuple(p.shape)} fits no LSTM weight for input_size "
                             f"{input_size}, hidden_size {hidden_size}")
        slots.append(Slot(name, p, 'w', options, size))
    if not slots:
        raise CheckError("my_LSTM has no parameters: build it from nn.Linear or nn.Parameter, so the optimizer sees them")
    return slots


@torch.no_grad()
def fill(slots, weights, into=None, grad=False):
    """Write the nn.LSTM-layout `weights` into the slots that have a role (the others: zeros).

    into: {name: tensor} to write to instead of the parameters (expected gradients); with
    grad=True every bias slot gets d/d b_ih, the gradient of any bias of its gate.
    """
    for s in slots:
        target = s.param if into is None else into[s.name]
        target.zero_()
        if s.gates is None:
            continue
        k = s.layer
        if s.kind == 'w':
            wx, wh = gate_rows(weights[f'weight_ih_l{k}'], s.gates), gate_rows(weights[f'weight_hh_l{k}'], s.gates)
            block = {'x': wx, 'h': wh, 'xh': torch.cat([wx, wh], 1), 'hx': torch.cat([wh, wx], 1)}[s.side]
            target.copy_(block.T if s.transposed else block)
        else:
            b_ih, b_hh = weights[f'bias_ih_l{k}'], weights[f'bias_hh_l{k}']
            parts = {'ih': b_ih, 'hh': b_hh, 'sum': b_ih + b_hh, 'zero': torch.zeros_like(b_ih)}
            target.copy_(torch.cat([gate_rows(b_ih if grad else parts[p], g) for g, p in zip(s.gates, s.parts)]))


def assignments(slots):
    """Every way to give the weight slots of one side their gates and orientation, each gate
    exactly once: the permutations of i, f, g, o cut into the slots' sizes, in their order."""
    if sum(s.size for s in slots) != 4:
        return
    for perm in itertools.permutations(GATES):
        cuts = list(itertools.accumulate([0] + [s.size for s in slots]))
        gates = [''.join(perm[a:b]) for a, b in zip(cuts, cuts[1:])]
        for options in itertools.product(*[s.options for s in slots]):
            yield [(side, transposed, g, None) for (side, transposed), g in zip(options, gates)]


class Matcher:
    """Finds each slot's role in a 1-layer my_LSTM by trial against the reference variants."""

    def __init__(self, lstm, slots, gen):
        self.lstm, self.slots, self.gen = lstm, slots, gen
        self.x = torch.randn(N, L, I, generator=gen)
        self.trials = 0

    def output(self):
        with torch.no_grad():
            self.trials += 1
            return padded(unpack(self.lstm(self.x))[0])

    def matches(self, weights, variant):
        fill(self.slots, weights)
        want = padded(reference(weights, self.x, None, variant, 1)[0])
        return diff(self.output(), want) < TOL

    def solve(self):
        """(variant, gates without bias) on success, with every slot's role set; else CheckError."""
        weights = [s for s in self.slots if s.kind == 'w']
        x_side = [s for s in weights if any(side != 'h' for side, _ in s.options)]
        h_side = [s for s in weights if any(side == 'h' for side, _ in s.options)]
        joint = [s for s in x_side if any(side in ('xh', 'hx') for side, _ in s.options)]
        for side, group in (('input', x_side), ('hidden', h_side + joint)):
            rows = sum(s.size for s in group)
            if rows != 4:
                raise CheckError(f"the {side} side has weights for {rows} gates' rows, not 4 "
                                 f"({', '.join(s.name for s in group) or 'none'})")
        # 1. the input side alone (W_hh and biases zero): gates, orientation, and the variant
        w = random_weights(1, self.gen, hidden=False, bias=False)
        variant = None
        for v in VARIANTS:
            ref_out = padded(reference(w, self.x, None, v, 1)[0])
            for roles in assignments(x_side):
                for s, r in zip(x_side, roles):
                    s.set_role(r)
                fill(self.slots, w)
                if diff(self.output(), ref_out) < TOL:
                    variant = v
                    break
            if variant:
                break
        else:
            for s in x_side:
                s.gates = None
            raise CheckError("no assignment of the input side's weights to the gates reproduces nn.LSTM "
                             "or one of the known bugs")
        # 2. the hidden side, with the input side known
        w = random_weights(1, self.gen, bias=False)
        h_only = [s for s in h_side if s not in joint]
        found = not h_only and self.matches(w, variant)
        ref_out = padded(reference(w, self.x, None, variant, 1)[0])
        for roles in (assignments(h_only) if h_only else []):
            for s, r in zip(h_only, roles):
                s.set_role(r)
            fill(self.slots, w)
            if diff(self.output(), ref_out) < TOL:
                found = True
                break
        if not found:
            raise CheckError("the input side matched, but no assignment of the hidden side's weights reproduces "
                             "nn.LSTM: is h(t-1) used, and the state carried from step to step?")
        # 3. each bias alone, the others zero: which gates' rows it holds (or none: unused)
        biases = [s for s in self.slots if s.kind == 'b']
        unused, found = [], {}
        for b in biases:
            b.gates = None
        for b in biases:
            for gates in itertools.permutations(GATES, b.size):
                w_b = dict(w, bias_ih_l0=torch.zeros(4 * H))
                for g in gates:
                    w_b['bias_ih_l0'][GATES.index(g) * H:(GATES.index(g) + 1) * H] = torch.randn(H, generator=self.gen)
                b.gates, b.parts = ''.join(gates), ['ih'] * b.size
                if self.matches(w_b, variant):
                    found[b.name] = b.gates
                    break
            else:
                unused.append(b.name)
            b.gates = b.parts = None
        for b in biases:
            b.gates = found.get(b.name)
            b.parts = [None] * b.size if b.gates else None
        # 4. share each gate's b_ih + b_hh among the biases that hold its rows
        holders = {g: [(b, j) for b in biases if b.gates for j, k in enumerate(b.gates) if k == g] for g in GATES}
        for g, hs in holders.items():
            for n, (b, j) in enumerate(hs):
                b.parts[j] = 'sum' if len(hs) == 1 else ('ih', 'hh')[n] if n < 2 else 'zero'
        no_bias = ''.join(g for g in GATES if not holders[g])
        w = random_weights(1, self.gen, no_bias=no_bias)
        if not self.matches(w, variant):
            raise CheckError("the weights matched, the biases did not")
        self.unused = unused
        return variant, no_bias


def layer_slots(slots1, lstm2):
    """The Slots of a 2-layer my_LSTM, with roles from the 1-layer one's: layer 0's parameters
    have the 1-layer model's names; each other one is paired with the layer-0 name that differs
    from it only in its numbers (cells.l1.fc_ii <-> cells.l0.fc_ii), else by position."""
    by_name = {s.name: s for s in slots1}
    params = list(lstm2.named_parameters())
    first = [(n, p) for n, p in params if n in by_name and by_name[n].param.shape == p.shape]
    rest = [(n, p) for n, p in params if n not in dict(first)]
    if len(first) != len(slots1):  # another structure: layer 0 is then the first parameters
        first, rest = params[:len(slots1)], params[len(slots1):]
        if [p.shape for _, p in first] != [s.param.shape for s in slots1]:
            raise CheckError("my_LSTM(6, 4, 2)'s parameters do not start with those of my_LSTM(6, 4, 1)")
        pair0 = dict(zip((n for n, _ in first), slots1))
    else:
        pair0 = {n: by_name[n] for n, _ in first}
    if len(rest) != len(slots1):
        layers = len(params) / len(slots1)
        raise CheckError(f"my_LSTM(6, 4, 2) has {len(params)} parameters, {layers:g} times those of one layer")
    pattern = lambda name: re.sub(r'\d+', '#', name)
    pairs = []
    for pos, (n, p) in enumerate(rest):
        same = [s for s in slots1 if pattern(s.name) == pattern(n)]
        pairs.append((n, p, same[0] if len(same) == 1 else slots1[pos]))
    out = []
    for n, p in first:
        s = Slot(n, p, pair0[n].kind)
        s.set_role(pair0[n].role())
        out.append(s)
    for n, p, s0 in pairs:
        if s0.kind == 'w' and p.dim() != 2 or s0.kind == 'b' and p.dim() != 1:
            raise CheckError(f"cannot pair layer 1's parameter {n} with one of layer 0")
        s = Slot(n, p, s0.kind)
        s.set_role(s0.role())
        s.layer = 1
        out.append(s)
    return out


def describe_roles(slots):
    """'input side: x2h=i,f,o,g; hidden side: h2h=i,f,o,g' for the weights line: each weight's
    gates (^T: used as x @ W), then any bias that is not its Linear's own, or is unused."""
    prefix = os.path.commonprefix([s.name for s in slots])
    prefix = prefix[:prefix.rfind('.') + 1] if len(slots) > 1 else ''
    weight_gates = {s.name[:-len('weight')]: s.gates for s in slots if s.kind == 'w'}
    parts = {'x': [], 'h': [], 'xh': [], 'b': []}
    for s in slots:
        name = s.name[len(prefix):]
        gates = ','.join(s.gates) if s.gates else 'unused'
        if s.kind == 'b':
            if s.gates is None or weight_gates.get(s.name[:-len('bias')]) != s.gates:
                parts['b'].append(f'{name}={gates}')
        else:
            name = name[:-len('.weight')] if name.endswith('.weight') else name
            side = 'xh' if s.side in ('xh', 'hx') else s.side
            parts[side].append(f'{name}{"^T" if s.transposed else ""}{" on [h, x]" if s.side == "hx" else ""}={gates}')
    label = {'x': 'input side', 'h': 'hidden side', 'xh': 'on [x, h]', 'b': 'biases'}
    return (f'(in {prefix.rstrip(".")}) ' if prefix else '') + \
        '; '.join(f'{label[k]}: {" ".join(v)}' for k, v in parts.items() if v)


# --------------------------------------------------------------------------------------
# The checks, in a process of their own per submission
# --------------------------------------------------------------------------------------

def where(e):
    """'ValueError: msg (DIY_LSTM.py:42)': the exception and the submission's line that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    own = os.path.abspath(__file__)
    theirs = [f for f in frames if os.path.abspath(f.filename) != own and 'site-packages' not in f.filename
              and 'torch' + os.sep not in f.filename]
    at = f' ({os.path.basename(theirs[-1].filename)}:{theirs[-1].lineno})' if theirs else ''
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
    return f'{type(e).__name__}: {msg}{at}'


class Report:
    """Writes one JSON line per event to the result file the parent reads (the submission's
    own prints go to a log instead, so they cannot garble the report)."""

    def __init__(self, path):
        self.f = open(path, 'a', buffering=1)

    def start(self, check):
        self.f.write(json.dumps({'start': check}) + '\n')

    def result(self, check, status, text):
        self.f.write(json.dumps({'check': check, 'status': status, 'text': text}) + '\n')


class Checker:
    """The checks of one imported submission, run in order; each reports one line. The weights
    check maps the submission's parameters (self.slots) and finds which LSTM it computes
    (self.variant, self.no_bias); the checks after it compare against that LSTM, on weights
    copied in through the map."""

    def __init__(self, module, opts, report):
        self.mod, self.opts, self.report = module, opts, report
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.variant = self.no_bias = None
        self.hx_ok = False  # does it take a dense hx? (else the gradient check leaves hx out)
        self.slots = {}     # num_layers -> Slots with roles, where matched
        self.models = {}    # num_layers -> the submission's my_LSTM(6, 4, num_layers)

    def run(self, name, fn):
        self.report.start(name)
        try:
            status, text = fn()
        except CheckError as e:
            status, text = 'FAIL', str(e)
        except Exception as e:  # the submission's code raised: that is the finding
            status, text = 'FAIL', f'raised {where(e)}'
        self.report.result(name, status, text)
        return status

    def build(self, *args):
        return self.mod.my_LSTM(*args, batch_first=True)

    # --- the checks, each returning (status, text) ---

    def interface(self):
        cls = getattr(self.mod, 'my_LSTM', None)
        if cls is None:
            raise CheckError('the file defines no my_LSTM')
        try:
            inspect.signature(cls).bind(I, H, 1, batch_first=True)
        except TypeError:
            raise CheckError(f'my_LSTM{inspect.signature(cls)} cannot be called as my_LSTM(input_size, '
                             'hidden_size, num_layers, batch_first=True)')
        except ValueError:
            pass  # no signature to read (a C type): building it will tell
        for layers in (1, 2):
            try:
                self.models[layers] = m = self.build(I, H, layers)
            except Exception as e:
                raise CheckError(f'my_LSTM({I}, {H}, {layers}, batch_first=True) raised {where(e)}')
            if not isinstance(m, nn.Module):
                raise CheckError(f'my_LSTM(...) built a {type(m).__name__}, not an nn.Module')
        try:
            inspect.signature(self.models[1].forward).bind(torch.zeros(1), None)
            inspect.signature(self.models[1].forward).bind(torch.zeros(1))
        except TypeError:
            raise CheckError(f'forward{inspect.signature(self.models[1].forward)} cannot be called as '
                             'forward(input, hx=None)')
        note = ''
        torch_rnns = [next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith('torch.'))
                      for m in self.models[1].modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        if torch_rnns:
            note = f' (note: it uses torch\'s nn.{torch_rnns[0]}; the lab asks for a hand-written cell)'
        return 'ok', 'my_LSTM(input_size, hidden_size, num_layers, batch_first=True), forward(input, hx=None)' + note

    def shapes(self):
        x = torch.randn(N, L, I, generator=self.gen)
        problems = []
        for layers, m in self.models.items():
            out, h_n, c_n = unpack(m(x))
            for what, t, want in (('output', out, (N, L, H)), ('h_n', h_n, (layers, N, H)), ('c_n', c_n, (layers, N, H))):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else describe_value(t)
                if got != want:
                    problems.append(f'{layers} layer(s): {what} {got}, expected {want}')
        lengths = [L, 3, 2]
        out = unpack(self.models[1](pack_padded_sequence(x, lengths, batch_first=True)))[0]
        if not isinstance(out, PackedSequence):
            problems.append(f'a PackedSequence input gave {describe_value(out)}, not a PackedSequence '
                            '(DecoderRNN reads its .data)')
        elif tuple(out.data.shape) != (sum(lengths), H):
            problems.append(f'PackedSequence output .data {tuple(out.data.shape)}, expected {(sum(lengths), H)}')
        if problems:
            raise CheckError('; '.join(problems))
        return 'ok', (f'output (N, L, H) = {(N, L, H)}, h_n and c_n (num_layers, N, H) for 1 and 2 layers; '
                      'PackedSequence in, PackedSequence out')

    def weights(self):
        m = self.models[1]
        try:
            slots = find_slots(m, I, H)
            matcher = Matcher(m, slots, self.gen)
            self.variant, self.no_bias = matcher.solve()
        except CheckError as e:
            raise CheckError(f'could not be matched to nn.LSTM\'s: {e}')
        self.slots[1] = slots
        text = f'matched by shape and by trial ({matcher.trials} trials): {describe_roles(slots)}'
        try:
            self.slots[2] = layer_slots(slots, self.models[2])
        except CheckError as e:
            self.layers2_error = str(e)
        return 'ok', text

    def bugs(self):
        return self.variant.bugs() + [f'no bias on the {GATE_NAMES[g]} (nn.LSTM adds b_i{g} + b_h{g})'
                                      for g in self.no_bias]

    def compare(self, layers, input, hx=None):
        """Run the submission and nn.LSTM (or the buggy LSTM it matched) on the same random
        weights: (its result, the reference's, the weights, max |diff| of output, h_n, c_n)."""
        w = random_weights(layers, self.gen, no_bias=self.no_bias)
        fill(self.slots[layers], w)
        with torch.no_grad():
            got = unpack(self.models[layers](input, hx) if hx is not None else self.models[layers](input))
            want = reference(w, input, hx, self.variant, layers)
        out_d = diff(padded(got[0]), padded(want[0]))
        h_d, c_d = diff(got[1], want[1][0]), diff(got[2], want[1][1])
        return got, want, w, (out_d, h_d, c_d)

    def verdict(self, diffs, forward=False):
        """('ok', text), or (None, what differs). A submission that matched a buggy LSTM fails
        the forward checks, naming the bugs; the others judge it against that LSTM, so that
        each bug is named once, where it is."""
        worst, bugs = max(diffs), self.bugs()
        subject = 'nn.LSTM' if not bugs else 'the LSTM it computes (see forward 1 layer)'
        if worst < TOL:
            if bugs and forward:
                raise CheckError(f'differs from nn.LSTM: {"; ".join(bugs)} (it equals an LSTM with '
                                 f'{"that bug" if len(bugs) == 1 else "those bugs"}, max |diff| {worst:.1e})')
            return 'ok', f'equals {subject} (max |diff| {worst:.1e})'
        names = [n for n, d in zip(('output', 'h_n', 'c_n'), diffs) if d >= TOL]
        return None, f'{", ".join(names)} differ{"s" if len(names) == 1 else ""} from {subject} (max |diff| {worst:.1e})'

    def needs(self, layers=1):
        if layers not in self.slots:
            why = getattr(self, 'layers2_error', None) if layers == 2 and 1 in self.slots else None
            raise CheckError(f'not checked: {why}' if why else 'not checked: the weights could not be matched')

    def batch(self):
        """The batch size the submission sees in (N, L, H_in) input: L where it ignores batch_first."""
        return N if self.variant.batch_first else L

    def forward(self, layers):
        def check():
            self.needs(layers)
            x = torch.randn(N, L, I, generator=self.gen)
            *_, diffs = self.compare(layers, x)
            status, text = self.verdict(diffs, forward=True)
            if status is None:
                raise CheckError(text)
            return status, text
        return check

    def judge_packed(self, lengths, enforce_sorted, hx=None, output_only=False):
        """A PackedSequence check: ('ok', text), or CheckError saying what is wrong. With
        output_only, h_n and c_n are not judged (the packed checks judge them)."""
        x = torch.randn(len(lengths), L, I, generator=self.gen)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        got, want, w, diffs = self.compare(1, packed, hx)
        if output_only:
            diffs = diffs[:1]
        if not isinstance(got[0], PackedSequence):
            raise CheckError(f'a PackedSequence input gave {describe_value(got[0])} as output, not a PackedSequence')
        status, text = self.verdict(diffs)
        if status:
            # right once unpacked; DecoderRNN also reads .data row by row against targets packed
            # like the input, so say so when its rows come in another order
            rows = pack_padded_sequence(padded(want[0]), lengths, batch_first=True, enforce_sorted=enforce_sorted).data
            if diff(got[0].data, rows) >= TOL:
                text += ("; note: its .data rows are not in the input's order, and DecoderRNN matches .data "
                         "against targets packed like the input")
            return status, text
        if diffs[0] < TOL:  # the output is right, the final states are not: which ones are they?
            zero_padded = pad_packed_sequence(packed, batch_first=True)[0]      # (N, L, I), as a student pads
            full = reference(w, zero_padded, hx, Variant(self.variant.acts, self.variant.cell_tanh), 1)[1]
            short = [b for b, n in enumerate(lengths) if n < L]
            if diff(got[1][:, short], full[0][:, short]) < TOL:
                raise CheckError("output right, but h_n/c_n are not at each sequence's own last step: finished "
                                 f"sequences keep updating their state (lengths {lengths})")
            if packed.sorted_indices is not None and diff(got[1], want[1][0][:, packed.sorted_indices]) < TOL:
                raise CheckError("output right, but h_n/c_n come in the sorted order, not the caller's: "
                                 "apply unsorted_indices")
        elif hx is not None and packed.sorted_indices is not None:
            swapped = tuple(t[:, packed.unsorted_indices] for t in hx)
            if diff(padded(got[0]), padded(reference(w, packed, swapped, self.variant, 1)[0])) < TOL:
                raise CheckError("hx is taken in the sorted order: it comes in the caller's order, as h_n goes out "
                                 "(index it with sorted_indices)")
        raise CheckError(text)

    def packed(self, enforce_sorted):
        def check():
            self.needs()
            return self.judge_packed([L, 4, 4, 2] if enforce_sorted else [3, L, 1, 3], enforce_sorted)
        return check

    def given_hx(self):
        self.needs()
        x = torch.randn(N, L, I, generator=self.gen)
        n = self.batch()
        hx = (torch.randn(1, n, H, generator=self.gen), torch.randn(1, n, H, generator=self.gen))
        got, want, w, diffs = self.compare(1, x, hx)
        status, text = self.verdict(diffs)
        if status is None:
            without = reference(w, x, None, self.variant, 1)
            if diff(padded(got[0]), padded(without[0])) < TOL:
                raise CheckError('hx is ignored: the output equals the one from zero initial states')
            raise CheckError(text)
        self.hx_ok = True
        lengths = [3, L, 1, 4]
        hx = (torch.randn(1, 4, H, generator=self.gen), torch.randn(1, 4, H, generator=self.gen))
        try:
            self.judge_packed(lengths, False, hx, output_only=True)
        except CheckError as e:
            raise CheckError(f'dense input right; a PackedSequence (enforce_sorted=False) with hx: {e}')
        return status, f'(h_0, c_0) given: dense, and PackedSequence (enforce_sorted=False) output: {text}'

    def gradients(self):
        """Input, h_0, c_0 and parameter gradients of a random weighting of output, h_n, c_n
        (h_0 and c_0 zeros, not judged, where the given-hx check failed: that one names it)."""
        self.needs()
        n = self.batch()
        x = torch.randn(N, L, I, generator=self.gen, requires_grad=True)
        h0 = (torch.randn(1, n, H, generator=self.gen) * self.hx_ok).requires_grad_()
        c0 = (torch.randn(1, n, H, generator=self.gen) * self.hx_ok).requires_grad_()
        r = [torch.randn(N, L, H, generator=self.gen), torch.randn(1, n, H, generator=self.gen),
             torch.randn(1, n, H, generator=self.gen)]
        m, slots = self.models[1], self.slots[1]
        w = random_weights(1, self.gen, no_bias=self.no_bias)
        fill(slots, w)
        m.zero_grad()
        got = unpack(m(x, (h0, c0)))
        sum((t * ri).sum() for t, ri in zip(got, r)).backward()
        got_grads = [x.grad, h0.grad, c0.grad]
        x.grad = h0.grad = c0.grad = None
        w = {k: v.clone().requires_grad_() for k, v in w.items()}
        want = reference(w, x, (h0, c0), self.variant, 1)
        sum((t * ri).sum() for t, ri in zip((want[0], *want[1]), r)).backward()
        expected = {s.name: torch.zeros_like(s.param) for s in slots}
        fill(slots, {k: v.grad for k, v in w.items()}, into=expected, grad=True)
        # an unused parameter (found so by the weights check) rightly gets none
        states = ('input', 'h_0', 'c_0') if self.hx_ok else ('input',)
        rows = [(name, a, b) for name, a, b in zip(states, got_grads, (x.grad, h0.grad, c0.grad))]
        rows += [(s.name, s.param.grad if s.param.grad is not None or s.gates is not None
                  else torch.zeros_like(s.param), expected[s.name]) for s in slots]
        bad = [f'{name} ({"no gradient" if a is None else f"max |diff| {diff(a, b):.1e}"})'
               for name, a, b in rows if a is None or diff(a, b) >= TOL]
        subject = "nn.LSTM's" if not self.bugs() else "those of the LSTM it computes (see forward 1 layer)"
        if bad:
            raise CheckError(f'gradients differ from {subject}: {", ".join(bad[:6])}{" ..." if len(bad) > 6 else ""}')
        worst = max(diff(a, b) for _, a, b in rows)
        return 'ok', (f'{", ".join(states)} and all {len(slots)} parameters equal {subject} '
                      f'(max |diff| {worst:.1e})')

    def toy_decoder(self, lstm_factory, device, E, Hd, V, seed):
        from model import DecoderRNN
        torch.manual_seed(seed)
        decoder = DecoderRNN(E, Hd, V, 1)
        torch.manual_seed(seed + 1)
        decoder.lstm = lstm_factory(E, Hd)
        return decoder.to(device)

    def trains(self):
        device = torch.device(self.opts.device)
        E, Hd, V, steps = 8, 16, 12, 30 if self.opts.quick else 40
        g = torch.Generator().manual_seed(1)
        lengths = [8, 6, 5, 3]
        captions = torch.randint(3, V, (len(lengths), max(lengths)), generator=g)
        features = torch.randn(len(lengths), E, generator=g)
        captions, features = captions.to(device), features.to(device)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data

        def train(factory):
            decoder = self.toy_decoder(factory, device, E, Hd, V, self.opts.seed)
            opt = torch.optim.Adam(decoder.parameters(), lr=0.02)
            losses, silent = [], None
            for step in range(steps):
                loss = nn.functional.cross_entropy(decoder(features, captions, lengths), targets)
                opt.zero_grad()
                loss.backward()
                if step == 0:
                    silent = [n for n, p in decoder.lstm.named_parameters() if p.grad is None or not p.grad.any()]
                opt.step()
                losses.append(loss.item())
            return losses, silent

        losses, silent = train(lambda e, h: self.build(e, h, 1))
        ref, _ = train(lambda e, h: nn.LSTM(e, h, 1, batch_first=True))
        text = (f'DecoderRNN with it: loss {losses[0]:.2f} -> {losses[-1]:.2f} in {steps} Adam steps on a toy batch '
                f'(with nn.LSTM: {ref[0]:.2f} -> {ref[-1]:.2f}; {device.type})')
        params = [n for n, _ in self.build(E, Hd, 1).named_parameters()]
        if not params:
            raise CheckError('my_LSTM has no parameters, so the optimizer cannot train it: ' + text)
        if len(silent) == len(params):
            raise CheckError('no parameter of my_LSTM gets a gradient (are the states detached?): ' + text)
        # 0.3: the decoder's embedding and output layer alone, on a frozen random LSTM, get
        # the loss down to ~0.6 of where it starts in these steps; a working LSTM to ~0.1
        if not all(map(math.isfinite, losses)) or losses[-1] > 0.3 * losses[0]:
            raise CheckError('the loss does not go down as it should: ' + text)
        if silent:
            text += f'; no gradient reaches {", ".join(silent[:4])}{" ..." if len(silent) > 4 else ""}'
        return 'ok', text

    def speed(self):
        device = torch.device(self.opts.device)
        if self.opts.quick:
            E, Hd, V, n, steps, reps = 16, 32, 50, 8, 8, 5
        else:
            E, Hd, V, n, steps, reps = 128, 256, 1000, 32, 16, 7
        g = torch.Generator().manual_seed(2)
        lengths = sorted(torch.randint(steps // 2, steps + 1, (n,), generator=g).tolist(), reverse=True)
        captions = torch.randint(3, V, (n, steps), generator=g).to(device)
        features = torch.randn(n, E, generator=g).to(device)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        runs = {}
        for key, factory in (('theirs', lambda e, h: self.build(e, h, 1)),
                             ('nn.LSTM', lambda e, h: nn.LSTM(e, h, 1, batch_first=True))):
            decoder = self.toy_decoder(factory, device, E, Hd, V, self.opts.seed)
            runs[key] = (decoder, torch.optim.Adam(decoder.parameters(), lr=1e-3), [])

        def step(decoder, opt):
            loss = nn.functional.cross_entropy(decoder(features, captions, lengths), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.type == 'cuda':
                torch.cuda.synchronize()

        for rep in range(reps + 1):  # interleaved, the first round a warm-up
            for decoder, opt, times in runs.values():
                t0 = time.perf_counter()
                step(decoder, opt)
                if rep:
                    times.append(time.perf_counter() - t0)
        mine, ref = (statistics.median(runs[k][2]) for k in ('theirs', 'nn.LSTM'))
        self.ratio = mine / ref
        return 'info', (f'{mine / ref:.1f}x nn.LSTM\'s time per DecoderRNN training step ({mine * 1e3:.1f} ms vs '
                        f'{ref * 1e3:.1f} ms, median of {reps}; N={n}, L<={steps}, E={E}, H={Hd}, V={V}, '
                        f'{device.type}, {torch.get_num_threads()} thread(s))')

    def all(self):
        if self.run('interface', self.interface) != 'ok':
            return
        self.run('shapes', self.shapes)
        self.run('weights', self.weights)
        self.run('forward 1 layer', self.forward(1))
        self.run('forward 2 layers', self.forward(2))
        self.run('packed sorted', self.packed(True))
        self.run('packed unsorted', self.packed(False))
        self.run('given hx', self.given_hx)
        self.run('gradients', self.gradients)
        self.run('trains', self.trains)
        self.run('speed', self.speed)


def worker(path, result_path, log_path, opts):
    """One submission's checks, in a child process: its own session (so the parent can kill
    everything it starts), its prints to a log, its findings to the result file."""
    with contextlib.suppress(OSError, AttributeError):  # no sessions on Windows
        os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    report = Report(result_path)
    report.start('import')
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.append(folder)  # its own helper modules, after the lab's
    try:
        spec = importlib.util.spec_from_file_location('student_DIY_LSTM', path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    except BaseException as e:
        report.result('import', 'FAIL', f'importing it raised {where(e)}')
        return
    Checker(module, opts, report).all()
    report.f.write(json.dumps({'done': True}) + '\n')


# --------------------------------------------------------------------------------------
# The parent: one child per submission, a time limit each, the report
# --------------------------------------------------------------------------------------

def find_submission(path):
    """The DIY_LSTM.py a PATH names (a .py file, or a folder holding exactly one DIY_LSTM.py,
    at its top or below), or None."""
    if os.path.isfile(path):
        return path if path.endswith('.py') else None
    if os.path.isdir(path):
        top = os.path.join(path, 'DIY_LSTM.py')
        if os.path.isfile(top):
            return top
        found = [os.path.join(d, 'DIY_LSTM.py') for d, _, files in os.walk(path) if 'DIY_LSTM.py' in files]
        return found[0] if len(found) == 1 else None
    return None


class Run:
    """One submission's child process and what it has reported so far."""

    def __init__(self, ctx, path, tmp, index, opts):
        self.path = path
        self.result_path = os.path.join(tmp, f'{index}.jsonl')
        self.log_path = os.path.join(tmp, f'{index}.log')
        open(self.result_path, 'w').close()
        self.proc = ctx.Process(target=worker, args=(path, self.result_path, self.log_path, opts), daemon=True)
        self.started = time.monotonic()
        self.proc.start()
        self.timed_out = False

    def poll(self, timeout):
        if self.proc.is_alive() and time.monotonic() - self.started > timeout:
            self.timed_out = True
            self.kill()
        return not self.proc.is_alive()

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):  # not a session leader (yet), or Windows
            self.proc.kill()
        self.proc.join()

    def results(self, timeout):
        """[(check, status, text)] in order, with a last line when the child did not finish."""
        rows, current, done = [], None, False
        with open(self.result_path) as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:  # the last line, cut short by a kill
                    continue
                if 'start' in event:
                    current = event['start']
                elif 'check' in event:
                    rows.append((event['check'], event['status'], event['text']))
                    current = None
                else:
                    done = True
        if self.timed_out:
            rows.append(('timeout', 'FAIL', f'no result within {timeout:g} s; it hung in: {current or "start-up"}'
                         + (' (the checks above had finished)' if rows else '')))
        elif not done and not (rows and rows[-1][0] in ('import', 'interface') and rows[-1][1] == 'FAIL'):
            tail = ''
            with contextlib.suppress(OSError), open(self.log_path, errors='replace') as f:
                lines = [ln.strip() for ln in f if ln.strip()]
                tail = f'; its last output: {lines[-1][:200]}' if lines else ''
            rows.append(('crash', 'FAIL', f'the checking process died (exit code {self.proc.exitcode}) in: '
                                          f'{current or "start-up"}{tail}'))
        return rows


def print_report(path, rows):
    print(f'== {path}')
    width = max(len(c) for c, _, _ in rows)
    for check, status, text in rows:
        print(f'  {check:<{width}}  {status:<4}  {text}')
    failed = [c for c, s, _ in rows if s == 'FAIL']
    verdict = 'PASS' if not failed else 'FAIL'
    print(f'verdict: {verdict}  {path}' + (f'  (failed: {", ".join(failed)})' if failed else ''))
    print(flush=True)
    return failed


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('paths', nargs='+', metavar='PATH', help='a DIY_LSTM.py, or a folder holding one')
    parser.add_argument('--timeout', type=float, default=120, help='seconds per submission before it is stopped')
    parser.add_argument('--quick', action='store_true',
                        help='a shorter training run and a tiny speed measurement (the tests use it)')
    parser.add_argument('--jobs', type=int, default=1,
                        help='submissions checked at once (more than 1 makes the speed figures less reliable)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per submission')
    parser.add_argument('--seed', type=int, default=0, help='seed of the probe inputs and weights')
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device of the training and speed checks (the forward checks run on the CPU)')
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f'--timeout must be positive, got {args.timeout:g}')
    if args.jobs < 1 or args.threads < 1:
        parser.error('--jobs and --threads must be at least 1')
    return args


def main(argv=None):
    args = get_args(argv)
    paths = []
    for p in args.paths:
        found = find_submission(p)
        if found is None:
            what = 'does not exist' if not os.path.exists(p) else \
                'holds no single DIY_LSTM.py' if os.path.isdir(p) else 'is not a .py file'
            fail('check_lstm.py', f'{p} {what}: give a DIY_LSTM.py or a folder holding one')
        paths.append(found)
    # every child forks from one server that has imported torch and the lab's model.py once
    # (seconds each), so a check starts in milliseconds and still shares nothing with the others
    method = 'forkserver' if 'forkserver' in multiprocessing.get_all_start_methods() else 'spawn'
    ctx = multiprocessing.get_context(method)
    if method == 'forkserver':
        ctx.set_forkserver_preload(['torch', 'model'])
    failures, summary = 0, []
    with tempfile.TemporaryDirectory(prefix='check_lstm.') as tmp:
        pending, running, finished = list(enumerate(paths)), {}, {}
        next_to_print = 0
        while next_to_print < len(paths):
            while pending and len(running) < args.jobs:
                index, path = pending.pop(0)
                running[index] = Run(ctx, path, tmp, index, args)
            for index, run in list(running.items()):
                if run.poll(args.timeout):
                    finished[index] = running.pop(index)
            while next_to_print in finished:
                run = finished.pop(next_to_print)
                rows = run.results(args.timeout)
                failed = print_report(run.path, rows)
                failures += bool(failed)
                speed = next((t.split(' ')[0] for c, s, t in rows if c == 'speed' and s == 'info'), '-')
                summary.append((run.path, 'FAIL' if failed else 'PASS', ', '.join(failed), speed))
                next_to_print += 1
            time.sleep(0.02)
    if len(paths) > 1:
        width = max(len(p) for p, *_ in summary)
        print(f'{"submission":<{width}}  verdict  {"speed":>6}  failed checks')
        for path, verdict, failed, speed in summary:
            print(f'{path:<{width}}  {verdict:<7}  {speed:>6}  {failed}')
        print(f'{len(paths) - failures}/{len(paths)} pass')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
