"""Benchmark a shared CPU: a short training run alone, then two copies of it at once.

    flock /tmp/bench.lock python bench/bench_share.py      # both matmul libraries, old and new waiting
    python bench/bench_share.py --quick                     # tiny sizes, one round: seconds

The run is what train.py does on a CPU at its default sizes, shortened: the frozen ResNet-152
over --images crops of 224 x 224, as the feature cache's one pass does, then --steps training
steps at batch 128 of the tutorial's decoder (my_LSTM's fused path, on the library under test)
with a vocabulary of COCO's size on those features. It runs in its own process (this file with
--worker), as a user's script would, under one of two OpenMP settings:
    old   libgomp's own default (GOMP_SPINCOUNT=300000, OMP_WAIT_POLICY unset): a thread that
          waits at a barrier spins for about 3 ms before it sleeps, holding a core
    new   what cpu_env.py sets where the user has set nothing
With two runs on two cores, each run's spinning threads hold the cores the other's working
threads need. For each library and setting, every round times one run alone, then two at
once (each run's time; the table takes the slower), alternating the settings' order; the
table reports the median round. Targets: two at once at most 2.2x alone; new alone at most
5% slower than old alone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpu_env  # noqa: E402,F401  (first: OpenMP's settings must be in place before torch loads)
import torch  # noqa: E402

import fused_lstm  # noqa: E402
from report import machine, print_table  # noqa: E402

TARGET_SHARED, TARGET_ALONE = 2.2, 1.05  # two at once / alone; new alone / old alone
WAITING = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME')
QUICK = dict(rounds=1, images=4, crop_size=32, steps=2, batch_size=4, embed_size=16, hidden_size=32, vocab_size=50)
OLD = {'GOMP_SPINCOUNT': '300000'}                     # libgomp's default when nothing is set


def worker(args):
    """One training run; prints {'seconds', 'resnet', 'lstm'} as JSON."""
    import torch.nn as nn
    from torch.nn.utils.rnn import pack_padded_sequence

    from checkpoint import build_encoder, encoder_spec
    from model import DecoderRNN
    t0 = time.perf_counter()
    torch.manual_seed(0)
    encoder = build_encoder(args.embed_size, encoder_spec('none', 0)).eval()
    decoder = DecoderRNN(args.embed_size, args.hidden_size, args.vocab_size, 1)
    images = torch.randn(args.images, 3, args.crop_size, args.crop_size)
    t1 = time.perf_counter()
    with torch.no_grad():                                                  # the feature cache's pass
        features = torch.cat([encoder.extract(b) for b in images.split(args.batch_size)])  # (images, 2048)
    t2 = time.perf_counter()
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        rows = torch.randint(0, args.images, (args.batch_size,), generator=g)
        lengths = sorted(torch.randint(9, 24, (args.batch_size,), generator=g).tolist(), reverse=True)
        captions = torch.randint(4, args.vocab_size, (args.batch_size, lengths[0]), generator=g)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        loss = criterion(decoder(encoder.project(features[rows]), captions, lengths), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    t3 = time.perf_counter()
    print(json.dumps({'seconds': t3 - t1, 'resnet': t2 - t1, 'lstm': t3 - t2, 'setup': t1 - t0}))


def launch(args, env_vars, lib, copies):
    """Start `copies` runs at once with OpenMP settings env_vars and library lib; their results."""
    env = {k: v for k, v in os.environ.items() if k not in WAITING}
    env.update(env_vars, LSTM_CPU_MATMUL=lib)
    cmd = [sys.executable, os.path.abspath(__file__), '--worker'] + sizes(args)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f'bench_share.py: error: a run under {env_vars}, {lib} exited {[p.returncode for p in procs]}')
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def sizes(args):
    return ['--images', str(args.images), '--crop_size', str(args.crop_size), '--steps', str(args.steps),
            '--batch_size', str(args.batch_size), '--embed_size', str(args.embed_size),
            '--hidden_size', str(args.hidden_size), '--vocab_size', str(args.vocab_size)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes, one round, one library, the new setting only: seconds')
    parser.add_argument('--new', default=None, metavar='KEY=VALUE[,KEY=VALUE]',
                        help='the OpenMP setting to compare with the old one, e.g. GOMP_SPINCOUNT=1000. '
                             "Default: cpu_env.py's")
    parser.add_argument('--rounds', type=int, default=3, help='rounds; the median is reported. Default: 3')
    parser.add_argument('--cpu_matmul', default='both', choices=['both', 'mkl', 'onednn'],
                        help="the fused LSTM's CPU matmul library (LSTM_CPU_MATMUL) to measure. Default: both")
    # the run's sizes
    parser.add_argument('--images', type=int, default=16, help='crops through the ResNet. Default: 16')
    parser.add_argument('--crop_size', type=int, default=224, help="crop size. Default: train.py's, 224")
    parser.add_argument('--steps', type=int, default=20, help='decoder training steps. Default: 20')
    parser.add_argument('--batch_size', type=int, default=128, help='crops per ResNet pass, captions per step. '
                        "Default: train.py's, 128")
    parser.add_argument('--embed_size', type=int, default=256, help='E. Default: 256')
    parser.add_argument('--hidden_size', type=int, default=512, help='H. Default: 512')
    parser.add_argument('--vocab_size', type=int, default=10000, help="V. Default: 10000 (COCO's at build_vocab's "
                        'threshold)')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if min(args.rounds, args.images, args.crop_size, args.steps, args.batch_size) < 1 or args.batch_size < 2:
        parser.error('--rounds, --images, --crop_size, --steps must be >= 1 and --batch_size >= 2')
    if args.worker:
        return worker(args)
    print(vars(args))
    try:
        new = dict(kv.split('=', 1) for kv in args.new.split(',')) if args.new else dict(cpu_env.DEFAULTS)
    except ValueError:
        parser.error(f'--new {args.new}: expected KEY=VALUE[,KEY=VALUE]')
    settings = {'new': new} if args.quick else {'old': OLD, 'new': new}
    libs = fused_lstm.cpu_matmuls() if args.cpu_matmul == 'both' else [args.cpu_matmul]
    libs = libs[:1] if args.quick else libs
    load_start, tic = os.getloadavg()[0], time.perf_counter()
    times = {}                                              # (lib, setting) -> [(alone, two at once)]
    for r in range(args.rounds):
        for lib in libs:
            for setting in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                alone = launch(args, settings[setting], lib, 1)[0]['seconds']
                pair = max(run['seconds'] for run in launch(args, settings[setting], lib, 2))
                times.setdefault((lib, setting), []).append((alone, pair))

    print(machine() + f' at end, {load_start:.1f} at start; threads and library per run as the table says; '
          f'median of {args.rounds} round(s), ran in {time.perf_counter() - tic:.0f} s')
    print(f'old: {OLD} (libgomp default); new: {new}' + ('' if args.new else ' (cpu_env.py)')
          + '; each setting with the other waiting variables unset')
    header = ('matmul library', 'OpenMP waiting', 'alone s', 'two at once s', 'ratio', 'alone vs old', 'ok')
    rows = []
    for lib in libs:
        alone = {k: statistics.median(a for a, _ in times[(lib, k)]) for k in settings}
        for setting in settings:
            pair = statistics.median(p for _, p in times[(lib, setting)])
            vs_old = alone[setting] / alone['old'] if 'old' in alone else None
            ok = pair / alone[setting] <= TARGET_SHARED and (vs_old is None or vs_old <= TARGET_ALONE)
            rows.append((lib, setting, f'{alone[setting]:.2f}', f'{pair:.2f}', f'{pair / alone[setting]:.2f}x',
                         '-' if vs_old is None else f'{vs_old:.2f}x',
                         ('yes' if ok else 'NO') if setting == 'new' else '-'))
    print_table(header, rows)
    print(f'targets for new: two at once <= {TARGET_SHARED}x alone, alone <= {TARGET_ALONE}x old alone')


if __name__ == '__main__':
    main()
