"""Benchmark my_LSTM against nn.LSTM on the decoder's workloads, with copied weights.

    python bench/bench_lstm.py                  # CPU, 2 threads, 11 rounds
    python bench/bench_lstm.py --device cuda    # adds (d): the same against cuDNN
    python bench/bench_lstm.py --quick          # tiny sizes, one round: seconds (the tests' run)

Cases (sizes from the tutorial's decoder: E = 256, H = 512, 1 layer, batch 128):
    (a) training step: forward + backward of a PackedSequence of 128 captions,
        lengths uniform in [9, 23]
    (b) the same batch padded to the longest caption (dense input)
    (c) greedy decoding: 20 single steps at batch 1 carrying the state, under no_grad
    (d) on CUDA: (a) and (c) against cuDNN, TF32 set the same way for both

Each case runs nn.LSTM, my_LSTM's fused path (fused_lstm.py, the default) and its plain
path (fused=False: DIY_LSTM's cell step by step, autograd for the backward), so the table
shows what the fast path buys. Every round runs every case and variant once, in
alternating order, after a warm-up, and the table reports the median round; outputs and
gradients are checked to agree before anything is timed.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpu_env  # noqa: E402,F401  (first: OpenMP's settings must be in place before torch loads)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import fused_lstm  # noqa: E402  (the repository root is not a package)
from DIY_LSTM import my_LSTM  # noqa: E402
from report import machine, print_table  # noqa: E402

# targets for the fused path: my_LSTM time / nn.LSTM time at most this (None: report only)
TARGETS = {'cpu': {'a': 0.75, 'b': 1.05, 'c': 0.5}, 'cuda': {'a': 2.0, 'c': None}}
QUICK = dict(rounds=1, warmup=0, batch_size=4, embed_size=8, hidden_size=16, min_len=2, max_len=5, steps=3)


def make_cases(args, device):
    """{case: (description, {variant: callable})} for one device; each callable runs once."""
    g = torch.Generator().manual_seed(args.seed)
    ref = nn.LSTM(args.embed_size, args.hidden_size, 1, batch_first=True).to(device)
    models = {'nn.LSTM': ref, 'fused': my_LSTM.from_lstm(ref), 'plain': my_LSTM.from_lstm(ref, fused=False)}
    N, E = args.batch_size, args.embed_size
    # collate_fn sorts captions longest first, and pack_padded_sequence wants that too
    lengths = sorted(torch.randint(args.min_len, args.max_len + 1, (N,), generator=g).tolist(), reverse=True)
    x = torch.randn(N, lengths[0], E, generator=g).to(device).requires_grad_()     # (N, L, E)
    steps = torch.randn(args.steps, 1, 1, E, generator=g).to(device)              # (steps, N=1, L=1, E)

    def train_step(model, packed):
        def run():
            x.grad = None
            model.zero_grad(set_to_none=True)
            inp = pack_padded_sequence(x, lengths, batch_first=True) if packed else x
            out, (h, c) = model(inp)
            out = out.data if packed else out
            # a loss that reaches every output and final state
            (out.sum() + h.sum() + c.sum()).backward()
            return out, h, c
        return run

    def greedy(model):
        @torch.no_grad()
        def run():
            states = None
            outs = []
            for x_t in steps:
                out, states = model(x_t, states)                                 # (1, 1, H)
                outs.append(out)
            return torch.cat(outs), states[0], states[1]
        return run

    cases = {'a': ('packed train step', {k: train_step(m, True) for k, m in models.items()}),
             'b': ('dense train step', {k: train_step(m, False) for k, m in models.items()}),
             'c': (f'greedy {args.steps} steps', {k: greedy(m) for k, m in models.items()})}
    if device.type == 'cuda':
        cases = {'a': cases['a'], 'c': cases['c']}
    # check the variants agree before timing them: outputs, states, input and weight gradients
    for name, (_, variants) in cases.items():
        results = {}
        for k, fn in variants.items():
            x.grad = None
            outs = fn()
            grads = [] if name == 'c' else [x.grad] + [g for _, g in sorted(lstm_grads(models[k]).items())]
            results[k] = [t.detach().clone() for t in outs + tuple(grads)]
        for path in ('fused', 'plain'):
            for a, b in zip(results['nn.LSTM'], results[path]):
                err = (a.float() - b.float()).abs().max().item()
                tol = args.atol * max(1.0, a.float().abs().max().item())
                if err > tol:
                    sys.exit(f'bench_lstm.py: error: case ({name}) on {device}: my_LSTM ({path}) differs from '
                             f'nn.LSTM by {err:.2e}')
    return cases


def lstm_grads(model):
    """The weight gradients under nn.LSTM's names and layout, for either module."""
    if isinstance(model, nn.LSTM):
        return {name: p.grad for name, p in model.named_parameters()}
    return {f'{name}_{suffix}': torch.cat([p.grad for p in params])
            for suffix, cell in model.cells.items() for name, params in cell.lstm_layout()}


def time_rounds(cases, device, args):
    """{(case, variant): [seconds per round]}, variants interleaved and alternated each round."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = {(c, k): [] for c, (_, variants) in cases.items() for k in variants}
    for r in range(args.warmup + args.rounds):
        for c, (_, variants) in cases.items():
            order = list(variants.items())
            for k, fn in (order if r % 2 == 0 else order[::-1]):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if r >= args.warmup:
                    times[(c, k)].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    # what runs where
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="cpu, or cuda (adds case (d) against cuDNN). Default: cuda if available, else cpu")
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes and one round (flags given still win), to check that it runs')
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads for the CPU cases. Default: 2')
    parser.add_argument('--cpu_matmul', default=fused_lstm.CPU_MATMUL, choices=['auto', 'mkl', 'onednn'],
                        help="library for the fused path's float32 CPU matmuls (fused_lstm.CPU_MATMUL): auto picks "
                             "oneDNN on AMD CPUs and MKL elsewhere. Default: $LSTM_CPU_MATMUL, else auto")
    parser.add_argument('--tf32', type=int, default=0, choices=[0, 1],
                        help='allow TF32 on CUDA, for matmuls and cuDNN alike. Default: 0')
    parser.add_argument('--rounds', type=int, default=11, help='timed rounds; the median is reported. Default: 11')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first. Default: 2')
    parser.add_argument('--seed', type=int, default=0, help='seed of weights, inputs and lengths. Default: 0')
    # workload (the tutorial decoder's sizes)
    parser.add_argument('--batch_size', type=int, default=128, help='captions per batch. Default: 128')
    parser.add_argument('--embed_size', type=int, default=256, help='LSTM input size. Default: 256')
    parser.add_argument('--hidden_size', type=int, default=512, help='LSTM hidden size. Default: 512')
    parser.add_argument('--min_len', type=int, default=9, help='shortest caption. Default: 9')
    parser.add_argument('--max_len', type=int, default=23, help='longest caption. Default: 23')
    parser.add_argument('--steps', type=int, default=20, help='greedy decoding steps in (c). Default: 20')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='agreement required before timing, relative to the largest value. Default: 1e-4')
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or not 1 <= args.min_len <= args.max_len:
        parser.error('--rounds and --threads must be >= 1 and 1 <= --min_len <= --max_len')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: no CUDA device here; use --device cpu')
    print(vars(args))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    fused_lstm.CPU_MATMUL = args.cpu_matmul
    devices = [torch.device('cpu')]
    if args.device.startswith('cuda'):
        # matched precision: cuDNN's RNN and our matmuls both use TF32, or neither does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        devices.append(torch.device(args.device))
    elif args.device != 'cpu':
        parser.error(f"--device {args.device}: expected cpu or cuda[:k]")

    rows = []
    for device in devices:
        cases = make_cases(args, device)
        times = time_rounds(cases, device, args)
        for c, (desc, _) in cases.items():
            ms = {k: statistics.median(times[(c, k)]) * 1e3 for k in ('nn.LSTM', 'fused', 'plain')}
            target = TARGETS[device.type][c]
            name = f'({c}) {desc}' if device.type == 'cpu' else f'(d) {desc}, cuda vs cuDNN'
            ratio = ms['fused'] / ms['nn.LSTM']
            ok = '-' if target is None else ('yes' if ratio <= target else 'NO')
            rows.append((name, f"{ms['nn.LSTM']:.2f}", f"{ms['fused']:.2f}", f'{ratio:.2f}x',
                         '-' if target is None else f'<= {target}x', ok,
                         f"{ms['plain']:.2f}", f"{ms['plain'] / ms['nn.LSTM']:.2f}x"))
    # the load average says whether other work shared the cores while this ran
    print(machine(args.threads) + f', median of {args.rounds} rounds'
          + (f', {torch.cuda.get_device_name()}' if len(devices) > 1 else ''))
    print_table(('case', 'nn.LSTM ms', 'fused ms', 'ratio', 'target', 'ok', 'plain ms', 'plain ratio'), rows)

if __name__ == '__main__':
    main()
