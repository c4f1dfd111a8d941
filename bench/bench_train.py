"""Benchmark train.py's training step: the tutorial's (ResNet on every batch) against cached features.

    python bench/bench_train.py                              # CPU: 2 threads, batch 16, 1-4 min
    python bench/bench_train.py --device cuda                # GPU: batch 128, also peak GPU memory
    python bench/bench_train.py --quick                      # tiny sizes, one round: seconds (the tests' run)

Variants, the same model (the tutorial's decoder: E = 256, H = 512, 1 layer, V = 9,956, COCO's
threshold-4 vocabulary), the same captions (lengths uniform in 9..23, <start> and <end> included),
the same Adam over decoder + encoder.linear + encoder.bn and the same loss, both through
train.TrainModel and the body of train.py's loop:
    (a) tutorial step: collate N crops (N, 3, 224, 224) -> frozen ResNet-152 (eval, no_grad)
        -> linear + bn -> decoder -> loss -> backward -> Adam step
    (b) cached step: read N rows of a memory-mapped (V, images, 2048) float32 feature file as
        FeatureDataset does, collate_fn -> linear + bn -> decoder -> the same loss, backward, step
Both time the whole step, their data side included ("data ms" says how much of it that is);
(a) leaves out JPEG decoding and cropping, which only make it slower. The two must compute the
same loss on the same batch ((b)'s features = encoder.extract of (a)'s crops, read back through
the file) before anything is timed. Every round runs both, in alternating order, after a warm-up
round; each runs as many steps as fill --round_s (at least one); the table reports the median
round. Epoch times for COCO (414,113 captions) and the feature cache's one-off build
(82,783 images) are extrapolated from the measured rates.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpu_env  # noqa: E402,F401  (first: OpenMP's settings must be in place before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from report import machine, print_table  # noqa: E402
from checkpoint import build_encoder, encoder_spec  # noqa: E402  (the repository root is not a package)
from data_loader import collate_fn  # noqa: E402
from model import DecoderRNN  # noqa: E402
from train import TrainModel  # noqa: E402

COCO_CAPTIONS, COCO_IMAGES = 414_113, 82_783  # captions_train2014.json
TARGET_RATIO, TARGET_EPOCH_S, CARD_GIB = 10, 120, 12  # the issue's: (b) >= 10x (a); GPU epoch < 2 min; 12 GB card
QUICK = dict(rounds=1, warmup=0, round_s=0.01, batch_size=2, crop_size=32, embed_size=16, hidden_size=32,
             vocab_size=50, min_len=3, max_len=6, cache_rows=8)


def hms(seconds):
    """1234.5 -> '20:35', 5000 -> '1:23:20'."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def make_batches(args, device, encoder, tmp):
    """The two data sides: callables giving (inputs, captions (N, L), lengths) on the host,
    and the file's rows that hold the features of (a)'s crops."""
    g = torch.Generator().manual_seed(args.seed)
    N, crop = args.batch_size, args.crop_size
    # captions as COCO's look once encoded: [<start>=1, words (ids 4..V-1), <end>=2]
    lengths = torch.randint(args.min_len, args.max_len + 1, (N,), generator=g).tolist()
    captions = [torch.cat([torch.tensor([1]), torch.randint(4, args.vocab_size, (n - 2,), generator=g),
                           torch.tensor([2])]) for n in lengths]
    crops = [torch.randn(3, crop, crop, generator=g) for _ in range(N)]  # decoded, cropped, normalised

    # the cache file, laid out as feature_cache.py writes it: (V, images, D) float32, memory-mapped
    path = os.path.join(tmp, 'features.npy')
    out = np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(1, args.cache_rows, 2048))
    out[:] = np.abs(np.random.default_rng(args.seed).standard_normal(out.shape, dtype=np.float32))  # >= 0: pooled ReLUs
    check_rows = torch.randperm(args.cache_rows, generator=g)[:N].numpy()
    with torch.autocast(device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
        x = torch.stack(crops).to(device)
        if device.type == 'cuda':
            x = x.contiguous(memory_format=torch.channels_last)
        out[0, check_rows] = encoder.extract(x).float().cpu().numpy()  # as FeatureCache._fill
    out.flush()
    del out
    features = np.load(path, mmap_mode='r')  # read-only, as FeatureCache.load gives it
    pin = device.type == 'cuda'  # train.py's DataLoader pins its batches on a GPU

    def tutorial_batch():
        images, targets, lens = collate_fn(list(zip(crops, captions)))
        return (images.pin_memory() if pin else images), targets, lens

    def cached_batch(rows=None):
        rows = torch.randint(0, args.cache_rows, (N,)).numpy() if rows is None else rows  # a shuffled epoch's
        # FeatureDataset.__getitem__: copy the row out of the read-only map (torch wants writable memory)
        items = [(torch.from_numpy(np.array(features[0, r])), c) for r, c in zip(rows, captions)]
        feats, targets, lens = collate_fn(items)
        return (feats.pin_memory() if pin else feats), targets, lens

    return tutorial_batch, cached_batch, check_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    # what runs where
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda[:k]. Default: cuda if available, else cpu')
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes and one round (flags given still win), to check that it runs')
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads. Default: 2')
    parser.add_argument('--amp', default='off', choices=['off', 'bf16', 'fp16'],
                        help="autocast as train.py's --amp (fp16 adds its gradient scaler). Default: off")
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds; the median is reported. Default: 7')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first. Default: 1')
    parser.add_argument('--round_s', type=float, default=1.0,
                        help='each variant runs as many steps per round as fill this many seconds '
                             '(at least one), counted in the warm-up. Default: 1.0')
    parser.add_argument('--seed', type=int, default=0, help='seed of weights, crops and captions. Default: 0')
    # workload (train.py's defaults)
    parser.add_argument('--batch_size', type=int, default=None,
                        help='captions per step. Default: 128 on cuda (train.py), 16 on cpu (a ResNet-152 '
                             'forward of 128 crops takes about a minute on 2 cores)')
    parser.add_argument('--crop_size', type=int, default=224, help='crop fed to the ResNet. Default: 224')
    parser.add_argument('--embed_size', type=int, default=256, help='E. Default: 256')
    parser.add_argument('--hidden_size', type=int, default=512, help='H. Default: 512')
    parser.add_argument('--num_layers', type=int, default=1, help='LSTM layers. Default: 1')
    parser.add_argument('--vocab_size', type=int, default=9956, help="V (COCO's threshold-4 vocabulary). Default: 9956")
    parser.add_argument('--min_len', type=int, default=9, help='shortest caption, <start>, <end> included. Default: 9')
    parser.add_argument('--max_len', type=int, default=23, help='longest caption. Default: 23')
    parser.add_argument('--cache_rows', type=int, default=4096,
                        help='images in the temporary feature file (b) reads from. Default: 4096')
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: no CUDA device here; use --device cpu')
    if args.device != 'cpu' and not args.device.startswith('cuda'):
        parser.error(f'--device {args.device}: expected cpu or cuda[:k]')
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 128 if device.type == 'cuda' else 16
    if min(args.rounds, args.threads, args.crop_size, args.vocab_size - 4) < 1 or args.batch_size < 2 \
            or args.warmup < 0 or not 3 <= args.min_len <= args.max_len or args.cache_rows < args.batch_size:
        parser.error('need --rounds, --threads, --crop_size >= 1, --batch_size >= 2 (BatchNorm), --warmup >= 0, '
                     '--vocab_size >= 5, 3 <= --min_len <= --max_len and --cache_rows >= --batch_size')
    print(vars(args))
    if device.type == 'cpu' and args.batch_size < 128:
        print(f'note: batch {args.batch_size} on CPU, not train.py\'s 128, so that (a) stays measurable; '
              f'rates are per caption, at this batch for both variants')
    args.amp_dtype = {'off': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]
    load_start, tic = os.getloadavg()[0], time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if device.type == 'cuda':  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    # the model as train.py builds it; random ResNet weights run as fast as ImageNet's
    encoder = build_encoder(args.embed_size, encoder_spec('none', args.seed)).to(device)
    if device.type == 'cuda':
        encoder.resnet.to(memory_format=torch.channels_last)
    decoder = DecoderRNN(args.embed_size, args.hidden_size, args.vocab_size, args.num_layers).to(device)
    # one model for both: a batch of pictures goes through the ResNet, one of features skips it (train.encode)
    model = TrainModel(encoder, decoder).train()
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)  # shared: both variants train the same model
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    criterion = nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def loss_of(inputs, captions, lengths):
        """train.py's forward: inputs to the device, autocast, loss in float32."""
        inputs = inputs.to(device, non_blocking=True)
        if inputs.dim() == 4 and device.type == 'cuda':                # pictures (N, 3, crop, crop)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        captions = captions.to(device, non_blocking=True)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        with torch.autocast(device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            return criterion(model(inputs, captions, lengths)[0].float(), targets)  # [1]: the attention penalty, None here

    def run(variant, steps):
        """`steps` whole training steps: (seconds per step, data seconds per step)."""
        data = 0.0
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            td = time.perf_counter()
            batch = batches[variant]()
            data += time.perf_counter() - td
            loss = loss_of(*batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        sync()  # no .item() per step, as in train.py: the host runs ahead until here
        return (time.perf_counter() - t0) / steps, data / steps

    with tempfile.TemporaryDirectory() as tmp:
        tutorial_batch, cached_batch, check_rows = make_batches(args, device, encoder, tmp)
        batches = {'a': tutorial_batch, 'b': cached_batch}
        # the same loss on the same batch before timing: (b) reads extract(crops) back from the file
        try:
            with torch.no_grad():
                loss_a = loss_of(*tutorial_batch()).item()
                loss_b = loss_of(*cached_batch(check_rows)).item()
        except RuntimeError as e:  # e.g. a module that does not run under this autocast
            sys.exit(f'bench_train.py: error: the training step fails on {device} with --amp {args.amp}: '
                     f'{str(e).splitlines()[0]}')
        tol = 1e-4 if args.amp_dtype is None else 2e-2
        if abs(loss_a - loss_b) > tol * abs(loss_a):
            sys.exit(f'bench_train.py: error: (a) and (b) disagree on the same batch: loss {loss_a:.6f} vs {loss_b:.6f}')

        steps = {'a': 1, 'b': 1}
        times = {'a': [], 'b': []}
        allocated, reserved = {'a': 0, 'b': 0}, {'a': 0, 'b': 0}  # peak GPU bytes per variant
        for r in range(args.warmup + args.rounds):
            for v in ('ab' if r % 2 == 0 else 'ba'):
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)
                t, data = run(v, steps[v])
                if device.type == 'cuda':
                    allocated[v] = max(allocated[v], torch.cuda.max_memory_allocated(device))
                    reserved[v] = max(reserved[v], torch.cuda.max_memory_reserved(device))
                if r < args.warmup:
                    steps[v] = max(1, min(200, round(args.round_s / t)))
                else:
                    times[v].append((t, data))

    # the median round of each variant (by step time), with its data time
    med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    rate = {v: args.batch_size / med[v][0] for v in med}
    ratio = rate['b'] / rate['a']
    gpu = device.type == 'cuda'
    names = {'a': '(a) tutorial: crops -> ResNet-152 -> decoder', 'b': '(b) cached: memmap features -> decoder'}
    header = ('variant', 'ms/step', 'data ms', 'captions/s', 'ratio vs (a)') + (('peak GPU MB',) if gpu else ())
    rows = [(names[v], f'{med[v][0] * 1e3:.1f}', f'{med[v][1] * 1e3:.1f}', f'{rate[v]:.1f}', f'{rate[v] / rate["a"]:.1f}x')
            + ((f'{allocated[v] / 2**20:.0f}',) if gpu else ()) for v in 'ab']

    # the load average and OpenMP's waiting say how much other work got in the way: with more
    # runnable threads than cores, threads spinning at OpenMP barriers slow small ops most
    print(machine(args.threads) + f' ({load_start:.1f} at start)'
          + (f', {torch.cuda.get_device_name(device)}' if gpu else ', no GPU used'))
    if load_start > os.cpu_count():
        print(f'note: load average {load_start:.1f} on {os.cpu_count()} cores: other work competes for them')
    print(f'run: {device}, batch {args.batch_size}, amp {args.amp}, median of {args.rounds} rounds '
          f'of {steps["a"]} (a) + {steps["b"]} (b) steps, after {args.warmup} warm-up round(s)')
    print_table(header, rows)
    print(f'check: same batch, same loss: (a) {loss_a:.6f}, (b) {loss_b:.6f}')
    print(f'(c) full COCO epoch ({COCO_CAPTIONS:,} captions) at batch {args.batch_size}: '
          f'(a) {hms(COCO_CAPTIONS / rate["a"])}, (b) {hms(COCO_CAPTIONS / rate["b"])}')
    # (a)'s step also trains the decoder, so its image rate is a lower bound on the ResNet's alone
    print(f'one-off cache build: {COCO_IMAGES:,} images x one ResNet-152 forward at (a)\'s {rate["a"]:.1f} '
          f'images/s: at most {hms(COCO_IMAGES / rate["a"])} (plus JPEG decoding)')
    print(f'ran in {hms(time.perf_counter() - tic)}')
    ok = lambda good: 'ok' if good else 'NOT MET'  # noqa: E731
    if gpu:
        epoch = COCO_CAPTIONS / rate['b']
        print(f'(b) epoch {hms(epoch)} (target < {hms(TARGET_EPOCH_S)} on a GPU): {ok(epoch < TARGET_EPOCH_S)}')
        # a card also holds the CUDA context (~0.5 GiB) and what the caching allocator keeps
        need = max(reserved.values()) / 2**30 + 0.5
        print(f'peak GPU memory at batch {args.batch_size}: allocated (a) {allocated["a"] / 2**30:.2f} GiB, '
              f'(b) {allocated["b"] / 2**30:.2f} GiB; reserved + context {need:.2f} GiB '
              f'(target: fits a {CARD_GIB} GB card): {ok(need <= CARD_GIB)}')
    print(f'(b)/(a) = {ratio:.3g}x (target >= {TARGET_RATIO}x): {ok(ratio >= TARGET_RATIO)}')


if __name__ == '__main__':
    main()
