"""check_lstm.py on submissions written here: good ones in every layout, and the classic bugs.

Each submission is a whole DIY_LSTM.py as a student would write it: a stack driver (below)
around a cell, the cell in one of the layouts, the bugs as small edits of a good file. One
checker run takes many submissions, each still in its own process, to keep the tests short.
"""
import os
import re

import pytest

from conftest import REPO, run

# the stack around the cell, as a student writes it: pad, loop over time, keep each sequence's
# last state, pack again
DRIVER = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


class my_LSTM(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers=1, batch_first=True):
        super().__init__()
        self.hidden_size, self.batch_first = hidden_size, batch_first
        self.layers = nn.ModuleList([Cell(input_size if k == 0 else hidden_size, hidden_size)
                                     for k in range(num_layers)])

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)
        else:
            x = input if self.batch_first else input.transpose(0, 1)
            lengths = torch.full((x.size(0),), x.size(1))
        N, T = x.shape[:2]
        h_n, c_n = [], []
        for k, cell in enumerate(self.layers):
            h = x.new_zeros(N, self.hidden_size) if hx is None else hx[0][k]
            c = x.new_zeros(N, self.hidden_size) if hx is None else hx[1][k]
            outs = []
            for t in range(T):
                h_new, c_new = cell(x[:, t], (h, c))
                keep = (t < lengths).unsqueeze(1)
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
                outs.append(h_new * keep)
            x = torch.stack(outs, 1)
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed:
            out = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=input.sorted_indices is None)
            return out, (h_n, c_n)
        return (x if self.batch_first else x.transpose(0, 1)), (h_n, c_n)
'''

# one nn.Linear per gate and side, named like a textbook (c for the candidate)
PER_GATE = '''
class Cell(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        for g in 'ifco':
            setattr(self, f'W_x{g}', nn.Linear(input_size, hidden_size))
            setattr(self, f'W_h{g}', nn.Linear(hidden_size, hidden_size))

    def forward(self, x, state):
        h, c = state
        i = torch.sigmoid(self.W_xi(x) + self.W_hi(h))
        f = torch.sigmoid(self.W_xf(x) + self.W_hf(h))
        g = torch.tanh(self.W_xc(x) + self.W_hc(h))
        o = torch.sigmoid(self.W_xo(x) + self.W_ho(h))
        c = f * c + i * g
        return o * torch.tanh(c), c
'''

# one nn.Linear(H_in, 4H) per side, the gates in cs231n's order i, f, o, g
FUSED = '''
class Cell(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.x2h = nn.Linear(input_size, 4 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, x, state):
        h, c = state
        a = self.x2h(x) + self.h2h(h)
        i, f, o, g = a.chunk(4, 1)
        i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
        c = f * c + i * g
        return o * torch.tanh(c), c
'''

# a single Linear on [x, h], gates f, i, g, o
JOINT = '''
class Cell(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.gates = nn.Linear(input_size + hidden_size, 4 * hidden_size)

    def forward(self, x, state):
        h, c = state
        f, i, g, o = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
'''

# cs231n's rnn_layers.py style: bare parameters used as x @ Wx, gates i, f, o, g
PARAMS = '''
class Cell(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.Wx = nn.Parameter(torch.randn(input_size, 4 * hidden_size) * 0.1)
        self.Wh = nn.Parameter(torch.randn(hidden_size, 4 * hidden_size) * 0.1)
        self.b = nn.Parameter(torch.zeros(4 * hidden_size))

    def forward(self, x, state):
        h, c = state
        H = h.size(1)
        a = x @ self.Wx + h @ self.Wh + self.b
        i, f, o = torch.sigmoid(a[:, :3 * H]).chunk(3, 1)
        g = torch.tanh(a[:, 3 * H:])
        c = f * c + i * g
        return o * torch.tanh(c), c
'''

GOOD = {'per_gate': DRIVER + PER_GATE, 'fused': DRIVER + FUSED, 'joint': DRIVER + JOINT, 'params': DRIVER + PARAMS}


def edit(source, old, new):
    assert old in source, old
    return source.replace(old, new)


# the classic bugs, each an edit of a good file, and the words the checker must say
BUGS = {
    'tanh_gate': (edit(GOOD['per_gate'], 'f = torch.sigmoid(', 'f = torch.tanh('),
                  'forward 1 layer', 'tanh on the forget gate f, which needs a sigmoid'),
    # sigmoid on chunks 0-2 and tanh on chunk 3 (cs231n's way), but nn.LSTM's names i, f, g, o
    'swapped_gates': (edit(GOOD['params'], '''        i, f, o = torch.sigmoid(a[:, :3 * H]).chunk(3, 1)
        g = torch.tanh(a[:, 3 * H:])''', '''        i, f, g = torch.sigmoid(a[:, :3 * H]).chunk(3, 1)
        o = torch.tanh(a[:, 3 * H:])'''),
                      'forward 1 layer', 'gates o and g swapped'),
    'bias_dropped': (edit(GOOD['per_gate'], 'f = torch.sigmoid(self.W_xf(x) + self.W_hf(h))',
                          'f = torch.sigmoid(F.linear(x, self.W_xf.weight) + F.linear(h, self.W_hf.weight))'),
                     'forward 1 layer', 'no bias on the forget gate f'),
    'keeps_updating': (edit(GOOD['fused'], 'keep = (t < lengths).unsqueeze(1)', 'keep = torch.ones(N, 1, dtype=torch.bool)'),
                       'packed sorted', 'finished sequences keep updating their state'),
    'batch_first_ignored': (edit(edit(GOOD['joint'], 'x = input if self.batch_first else input.transpose(0, 1)',
                                      'x = input.transpose(0, 1)'),
                                 'return (x if self.batch_first else x.transpose(0, 1)), (h_n, c_n)',
                                 'return x.transpose(0, 1), (h_n, c_n)'),
                            'forward 1 layer', 'batch_first ignored'),
    'hx_ignored': (edit(edit(GOOD['per_gate'], 'h = x.new_zeros(N, self.hidden_size) if hx is None else hx[0][k]',
                             'h = x.new_zeros(N, self.hidden_size)'),
                        'c = x.new_zeros(N, self.hidden_size) if hx is None else hx[1][k]', 'c = x.new_zeros(N, self.hidden_size)'),
                   'given hx', 'hx is ignored'),
}

# all four gates' input weights in one (4, H_in, H) tensor: right, but no shape the checker maps
ODD = edit(edit(GOOD['params'], 'self.Wx = nn.Parameter(torch.randn(input_size, 4 * hidden_size) * 0.1)',
                'self.Wx = nn.Parameter(torch.randn(4, input_size, hidden_size) * 0.1)'),
           'a = x @ self.Wx + h @ self.Wh + self.b', 'a = torch.cat([x @ w for w in self.Wx], 1) + h @ self.Wh + self.b')

# right values, but the output packed from the batch reversed: rows of equal-length sequences
# swap places in .data (unpacked, it is the same)
REORDERED = edit(GOOD['fused'], '''            out = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=input.sorted_indices is None)''',
                 '''            flip = torch.arange(N - 1, -1, -1)
            out = pack_padded_sequence(x[flip], lengths[flip], batch_first=True, enforce_sorted=False)
            order = flip[out.sorted_indices]
            out = PackedSequence(out.data, out.batch_sizes, order, torch.argsort(order))''')

BROKEN = {
    'no_import': ('import torch\nfrom torch import no_such_thing\n', 'import', 'ImportError'),
    'hangs': ('import time\nwhile True:\n    time.sleep(0.1)\n', 'timeout', 'it hung in: import'),
    'wrong_signature': (DRIVER.replace('def __init__(self, input_size, hidden_size, num_layers=1, batch_first=True)',
                                       'def __init__(self, input_size, hidden_size)').replace(
                                           'range(num_layers)', 'range(1)').replace('batch_first\n', 'True\n', 1)
                        + PER_GATE, 'interface', 'cannot be called as my_LSTM(input_size, hidden_size, num_layers'),
}


def write(tmp_path, name, source):
    folder = tmp_path / name
    folder.mkdir()
    (folder / 'DIY_LSTM.py').write_text(source)
    return str(folder)


def parse(stdout):
    """{submission folder name: {check: (status, text)}} and the verdicts, from the report."""
    reports, verdicts, current = {}, {}, None
    for line in stdout.splitlines():
        if line.startswith('== '):
            current = os.path.basename(os.path.dirname(line[3:]))
            reports[current] = {}
        elif line.startswith('verdict: '):
            verdicts[current] = line.split()[1]
        elif line.startswith('  ') and current is not None:
            m = re.match(r'  (.+?)\s{2,}(ok|FAIL|info)\s+(.*)', line)
            assert m, line
            reports[current][m[1]] = (m[2], m[3])
    return reports, verdicts


@pytest.fixture(scope='module')
def checked(tmp_path_factory):
    """One quick checker run over every written submission (each in its own process)."""
    tmp = tmp_path_factory.mktemp('subs')
    sources = dict(GOOD)
    sources.update({k: v[0] for k, v in BUGS.items()})
    sources.update({k: v[0] for k, v in BROKEN.items()})
    sources['odd'] = ODD
    sources['reordered'] = REORDERED
    paths = [write(tmp, name, src) for name, src in sources.items()]
    proc = run('check_lstm.py', '--quick', '--jobs', 2, '--timeout', 20, *paths, check=False)
    return proc, parse(proc.stdout)


def test_good_layouts_pass(checked):
    proc, (reports, verdicts) = checked
    for name in GOOD:
        assert verdicts[name] == 'PASS', (name, reports[name])
        for check in ('weights', 'forward 1 layer', 'forward 2 layers', 'packed sorted', 'packed unsorted',
                      'given hx', 'gradients', 'trains'):
            assert reports[name][check][0] == 'ok', (name, check, reports[name][check])
        assert reports[name]['speed'][0] == 'info'
    # the gate order it found, in the cs231n layouts: i, f, o, g
    assert 'x2h=i,f,o,g' in reports['fused']['weights'][1]
    assert 'Wx^T=i,f,o,g' in reports['params']['weights'][1]
    assert 'W_xc=g' in reports['per_gate']['weights'][1]
    assert proc.returncode == 1  # the bugs below fail


@pytest.mark.parametrize('bug', BUGS)
def test_classic_bugs_are_named(checked, bug):
    _, (reports, verdicts) = checked
    _, check, words = BUGS[bug]
    assert verdicts[bug] == 'FAIL', reports[bug]
    status, text = reports[bug][check]
    assert status == 'FAIL' and words in text, (check, status, text)


def test_bugs_are_named_where_they_are(checked):
    """A bug that only touches the final states leaves the forward and gradients alone."""
    _, (reports, _) = checked
    r = reports['keeps_updating']
    assert r['forward 1 layer'][0] == 'ok' and r['gradients'][0] == 'ok'
    assert r['packed unsorted'][0] == 'FAIL'
    # a bug in the forward is found with the weights matched, so the other checks still say something
    r = reports['hx_ignored']
    assert r['gradients'] == ('ok', r['gradients'][1]) and r['gradients'][1].startswith('input and all 16 parameters')
    r = reports['tanh_gate']
    assert r['weights'][0] == 'ok' and 'W_xf=f' in r['weights'][1]
    assert r['gradients'][0] == 'ok' and 'the LSTM it computes' in r['gradients'][1]


@pytest.mark.parametrize('broken', BROKEN)
def test_broken_files(checked, broken):
    _, (reports, verdicts) = checked
    _, check, words = BROKEN[broken]
    assert verdicts[broken] == 'FAIL'
    status, text = reports[broken][check]
    assert status == 'FAIL' and words in text, (status, text)


def test_summary_table(checked):
    proc, (reports, _) = checked
    table = proc.stdout[proc.stdout.index('submission '):].splitlines()
    assert len(table) == len(reports) + 2
    assert table[-1] == f'{len(GOOD) + 1}/{len(reports)} pass'  # and the reordered one


def test_packed_output_is_judged_unpacked(checked):
    """Another row order in .data passes (the values are right), with a note for the TA."""
    _, (reports, verdicts) = checked
    assert verdicts['reordered'] == 'PASS'
    for check in ('packed sorted', 'packed unsorted'):
        status, text = reports['reordered'][check]
        assert status == 'ok' and "note: its .data rows are not in the input's order" in text
        assert 'note' not in reports['fused'][check][1]


def test_unmatched_weights_still_checked(checked):
    """A layout it cannot map (a 3-D tensor of the gates) still gets the checks that need no
    weights; each of the others says why it was not checked."""
    _, (reports, verdicts) = checked
    r = reports['odd']
    assert r['weights'][0] == 'FAIL'
    assert r['weights'][1].startswith("could not be matched to nn.LSTM's: parameter layers.0.Wx of shape (4, 6, 4)")
    assert r['forward 1 layer'] == ('FAIL', 'not checked: the weights could not be matched')
    assert r['shapes'][0] == 'ok' and r['trains'][0] == 'ok' and r['speed'][0] == 'info'


def test_repo_lstm_passes_in_default_mode():
    """The lab's own DIY_LSTM.py, as a TA runs the checker: default flags, exit code 0."""
    proc = run('check_lstm.py', os.path.join(REPO, 'DIY_LSTM.py'), check=False)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-2].startswith('verdict: PASS'), proc.stdout
    reports, _ = parse(proc.stdout.replace(REPO + os.sep, REPO + os.sep + 'repo' + os.sep))
    r = reports['repo']
    assert '(in cells.l0) input side: fc_ii=i fc_if=f fc_ig=g fc_io=o; hidden side: fc_hi=i' in r['weights'][1]
    assert r['trains'][1].split('in ')[1].startswith('40 Adam steps')  # the full run, not --quick's


def test_usage_errors(tmp_path):
    """A bad PATH: one line naming it, exit code 2, before anything is checked."""
    good = write(tmp_path, 'good', GOOD['fused'])
    empty = tmp_path / 'empty'
    empty.mkdir()
    proc = run('check_lstm.py', good, str(empty), check=False)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == (f'check_lstm.py: error: {empty} holds no single DIY_LSTM.py: '
                           'give a DIY_LSTM.py or a folder holding one\n')


def test_finding_the_file(tmp_path):
    from check_lstm import find_submission
    assert find_submission(str(tmp_path / 'nowhere')) is None
    (tmp_path / 'alice' / 'lab3').mkdir(parents=True)
    (tmp_path / 'alice' / 'lab3' / 'DIY_LSTM.py').write_text('')
    assert find_submission(str(tmp_path / 'alice')) == str(tmp_path / 'alice' / 'lab3' / 'DIY_LSTM.py')
    (tmp_path / 'bob.py').write_text('')
    assert find_submission(str(tmp_path / 'bob.py')) == str(tmp_path / 'bob.py')
    assert find_submission(str(tmp_path)) == str(tmp_path / 'alice' / 'lab3' / 'DIY_LSTM.py')
    (tmp_path / 'carol').mkdir()
    (tmp_path / 'carol' / 'DIY_LSTM.py').write_text('')
    assert find_submission(str(tmp_path)) is None  # two of them: which one?
