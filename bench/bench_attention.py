"""Benchmark the attention decoder on the lab's my_LSTMCell against the same decoder on nn.LSTMCell.

    python bench/bench_attention.py             # CPU, 2 threads, the tutorial's sizes, 7 rounds
    python bench/bench_attention.py --quick     # tiny sizes, 2 rounds: seconds (what the tests run)

Cases (E = 256, H = 512, V = 9956 as the tutorial's COCO vocabulary, a 7 x 7 grid: R = 49):
    (a) training step: forward + backward of a batch of 128 captions, lengths uniform in
        [9, 23], the doubly stochastic penalty included
    (b) greedy decoding: 20 steps at batch 1 (no caption ends early: the work is fixed)

Variants: AttentionDecoder on my_LSTMCell (training steps the cell as written, autograd for
the backward; decoding takes fused_lstm's one-step path), the same decoder on nn.LSTMCell
with the same weights, and the tutorial's DecoderRNN (my_LSTM, same E, H, V and batch) for
scale. Every round runs every case and variant once, in alternating order, after a warm-up;
the table reports the median round (bench_lstm.time_rounds). Outputs are checked to agree
before anything is timed.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpu_env  # noqa: E402,F401  (first: OpenMP's settings must be in place before torch loads)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from bench_lstm import time_rounds  # noqa: E402  (bench/ is this script's folder)
from report import machine, print_table  # noqa: E402
from model import AttentionDecoder, DecoderRNN  # noqa: E402  (the repository root is not a package)

QUICK = dict(batch_size=4, embed_size=16, hidden_size=32, vocab_size=50, grid_size=2, min_len=4, max_len=8,
             steps=5, rounds=2, warmup=1)


def make_cases(args):
    """{case: (description, {variant: callable})}; each callable runs once and returns its output."""
    g = torch.Generator().manual_seed(args.seed)
    E, H, V, N, R = args.embed_size, args.hidden_size, args.vocab_size, args.batch_size, args.grid_size ** 2
    ours = AttentionDecoder(E, H, V, max_seq_length=args.steps)
    theirs = AttentionDecoder(E, H, V, max_seq_length=args.steps, cell=nn.LSTMCell)
    theirs.load_state_dict(ours.state_dict())           # the same weights: my_LSTMCell saves nn.LSTMCell's keys
    tutorial = DecoderRNN(E, H, V, 1, max_seq_length=args.steps)
    lengths = sorted(torch.randint(args.min_len, args.max_len + 1, (N,), generator=g).tolist(), reverse=True)
    captions = torch.randint(4, V, (N, lengths[0]), generator=g)                  # (N, L)
    regions = torch.randn(N, R, E, generator=g)                                   # (N, R, E)
    pooled = torch.randn(N, E, generator=g)                                       # (N, E)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    one_grid, one_vector = regions[:1], pooled[:1]

    def train_step(model):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(args.seed)                # the same dropout masks for both cells
            if isinstance(model, AttentionDecoder):
                logits, alphas = model(regions, captions, lengths, return_alphas=True)
                loss = nn.functional.cross_entropy(logits, targets) + model.doubly_stochastic(alphas, lengths)
            else:
                logits = model(pooled, captions, lengths)
                loss = nn.functional.cross_entropy(logits, targets)
            loss.backward()
            return logits
        return run

    def greedy(model):
        @torch.no_grad()
        def run():
            model.eval()                                    # no dropout
            if isinstance(model, AttentionDecoder):
                return model.sample(one_grid, end_id=-1)    # -1: no caption ends, all steps run
            return model.sample(one_vector)
        return run

    models = {'my_LSTMCell': ours, 'nn.LSTMCell': theirs, 'DecoderRNN': tutorial}
    cases = {'a': (f'train step, batch {N}', {k: train_step(m) for k, m in models.items()}),
             'b': (f'greedy {args.steps} steps, batch 1', {k: greedy(m) for k, m in models.items()})}
    # the two cells must compute the same thing before their times mean anything
    a = cases['a'][1]
    torch.testing.assert_close(a['my_LSTMCell'](), a['nn.LSTMCell'](), rtol=args.atol, atol=args.atol)
    b = cases['b'][1]
    assert torch.equal(b['my_LSTMCell'](), b['nn.LSTMCell']()), 'greedy decoding differs between the cells'
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='tiny sizes and 2 rounds: a check that it runs')
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads. Default: 2')
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds; the median is reported. Default: 7')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first. Default: 2')
    parser.add_argument('--seed', type=int, default=0, help='seed of weights, inputs and lengths. Default: 0')
    # workload (the tutorial decoder's sizes, a 224 crop's 7 x 7 grid)
    parser.add_argument('--batch_size', type=int, default=128, help='captions per batch in (a). Default: 128')
    parser.add_argument('--embed_size', type=int, default=256, help='E. Default: 256')
    parser.add_argument('--hidden_size', type=int, default=512, help='H. Default: 512')
    parser.add_argument('--vocab_size', type=int, default=9956, help="V (COCO's with build_vocab.py). Default: 9956")
    parser.add_argument('--grid_size', type=int, default=7, help='regions per side: R = grid_size**2. Default: 7')
    parser.add_argument('--min_len', type=int, default=9, help='shortest caption. Default: 9')
    parser.add_argument('--max_len', type=int, default=23, help='longest caption. Default: 23')
    parser.add_argument('--steps', type=int, default=20, help='greedy decoding steps in (b). Default: 20')
    parser.add_argument('--atol', type=float, default=1e-4, help='agreement required before timing. Default: 1e-4')
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.rounds < 1 or args.threads < 1 or not 1 <= args.min_len <= args.max_len:
        parser.error('--rounds and --threads must be >= 1 and 1 <= --min_len <= --max_len')
    print(vars(args))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    cases = make_cases(args)
    times = time_rounds(cases, torch.device('cpu'), args)
    rows = []
    for c, (desc, variants) in cases.items():
        ms = {k: statistics.median(times[(c, k)]) * 1e3 for k in variants}
        rows.append((f'({c}) {desc}', f"{ms['my_LSTMCell']:.2f}", f"{ms['nn.LSTMCell']:.2f}",
                     f"{ms['my_LSTMCell'] / ms['nn.LSTMCell']:.2f}x", f"{ms['DecoderRNN']:.2f}",
                     f"{ms['my_LSTMCell'] / ms['DecoderRNN']:.2f}x"))
    print(f'{machine(args.threads)}; median of {args.rounds} rounds')  # the CPU, and the load that shared it
    print_table(('case', 'my_LSTMCell ms', 'nn.LSTMCell ms', 'ratio', 'DecoderRNN ms', 'vs DecoderRNN'), rows)
    return rows


if __name__ == '__main__':
    main()
