"""Train the captioning model: only the decoder and the encoder's linear and bn learn.

    $ python train.py                      # MS-COCO 2014 under data/, the tutorial's defaults
    $ torchrun --nproc_per_node=4 train.py --amp bf16 --augment none   # 4 GPUs, cached features

Prints the lab's line every --log_step steps:
    Epoch [0/5], Step [0/3236], Loss: 9.2050, Perplexity: 9947.2122
and writes into --model_path: latest.pt (every --save_step steps, each epoch and on Ctrl-C),
best.pt (lowest validation loss, or best caption score with --select_by), train_log.csv and
train_log.png. --resume models/latest.pt continues exactly where it left off.
"""
import argparse
import csv
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from checkpoint import (EncoderWeightsError, build_encoder, encoder_id, encoder_spec, encoder_state,
                        load_checkpoint, save_checkpoint)
from data_loader import CocoDataset, collate_fn, image_transform
from model import DecoderRNN
from vocab import load_vocab


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data (the tutorial's flags and defaults)
    parser.add_argument('--model_path', type=str, default='models/', help='where checkpoints and logs go')
    parser.add_argument('--crop_size', type=int, default=224, help='size of the crop fed to the ResNet')
    parser.add_argument('--vocab_path', type=str, default='data/vocab.pkl', help='vocabulary made by build_vocab.py')
    parser.add_argument('--image_dir', type=str, default='data/resized2014', help='training images made by resize.py')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help='COCO-format training captions')
    parser.add_argument('--val_caption_path', type=str, default='data/annotations/captions_val2014.json',
                        help='validation captions; when missing, a held-out slice of the training images is used')
    parser.add_argument('--val_image_dir', type=str, default='data/resizedval2014',
                        help='validation images made by resize.py')
    parser.add_argument('--val_fraction', type=float, default=0.01,
                        help='share of training images held out when there is no validation set')
    parser.add_argument('--image_size', type=int, default=256, help='the size resize.py made the images (for sampling)')
    parser.add_argument('--log_step', type=int, default=10, help='step size for printing log info')
    parser.add_argument('--save_step', type=int, default=1000, help='step size for saving latest.pt')
    # model
    parser.add_argument('--embed_size', type=int, default=256, help='dimension of word embedding vectors')
    parser.add_argument('--hidden_size', type=int, default=512, help='dimension of lstm hidden states')
    parser.add_argument('--num_layers', type=int, default=1, help='number of layers in lstm')
    parser.add_argument('--max_seq_length', type=int, default=20, help='longest caption sample() generates')
    parser.add_argument('--encoder_weights', type=str, default='imagenet',
                        help="frozen ResNet-152 weights: 'imagenet', 'none' (random, seeded by --seed) or a path")
    # optimisation
    parser.add_argument('--num_epochs', type=int, default=5)
    parser.add_argument('--batch_size', type=int, default=128, help='captions per step, per GPU under torchrun')
    parser.add_argument('--num_workers', type=int, default=2, help='data loading processes (per GPU)')
    parser.add_argument('--learning_rate', type=float, default=0.001)
    # speed
    parser.add_argument('--augment', type=str, default='crop_flip', choices=['crop_flip', 'none'],
                        help="training crops: the tutorial's random crop and flip, or the centre crop")
    parser.add_argument('--feature_cache', type=str, default='auto', choices=['auto', 'on', 'off'],
                        help='run the frozen ResNet once per image and reuse its features; auto: wherever '
                             'that changes nothing but speed (validation, and training with --augment none)')
    parser.add_argument('--cache_views', type=int, default=5,
                        help='with --feature_cache on and --augment crop_flip: random crops cached per image')
    parser.add_argument('--feature_cache_dir', type=str, default=None,
                        help='where cached features go (default: features/ beside --image_dir)')
    parser.add_argument('--amp', type=str, default='off', choices=['off', 'bf16', 'fp16'],
                        help='mixed precision autocast (fp16 adds a gradient scaler)')
    # evaluation and checkpoints
    parser.add_argument('--select_by', type=str, default='loss', choices=['loss', 'bleu4', 'cider'],
                        help='validation measure that picks best.pt')
    parser.add_argument('--select_subset', type=int, default=1000,
                        help='validation images captioned for --select_by bleu4/cider')
    parser.add_argument('--recalibrate_bn', type=int, default=0,
                        help='before each evaluation, re-estimate the encoder bn statistics over this many '
                             'training batches (for short runs; 0: off, as in the tutorial)')
    parser.add_argument('--resume', type=str, default=None, help='checkpoint to continue from, e.g. models/latest.pt')
    parser.add_argument('--dry_run', action='store_true', help='one training step and one checkpoint, then exit')
    parser.add_argument('--max_steps', type=int, default=0, help='stop after this many steps in all (0: no limit)')
    # run
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="'cpu', 'cuda', 'cuda:1', 'mps'; under torchrun each process takes cuda:LOCAL_RANK")
    args = parser.parse_args(argv)
    for name in ('log_step', 'save_step', 'batch_size', 'num_epochs', 'cache_views', 'select_subset'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    if not 0 < args.val_fraction < 1:
        parser.error(f'--val_fraction must be in (0, 1), got {args.val_fraction}')
    if args.crop_size > args.image_size:
        parser.error(f'--crop_size {args.crop_size} is larger than --image_size {args.image_size}')
    return args


def fail(message):
    """Bad input: one line saying what is wrong and how to fix it, exit code 2, no traceback."""
    print(f'train.py: error: {message}', file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE

def setup_distributed(args):
    """Returns (rank, world_size, device). One process per GPU; gloo on CPU (tests)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        return 0, 1, torch.device(args.device)
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    if args.device.startswith('cuda'):
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device(args.device)
        dist.init_process_group('gloo')
    return rank, world_size, device


def all_sum(*values, device):
    """Sum floats over all processes (identity when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class EpochBatchSampler(BatchSampler):
    """The batches of one epoch, from batch `skip` on: a resumed epoch sees the rest of
    the same shuffled order without loading the batches it already trained on.

    A last batch of one caption is dropped: BatchNorm1d cannot train on a single item.
    """

    def __init__(self, sampler, batch_size, skip=0):
        super().__init__(sampler, batch_size, drop_last=False)
        self.skip = skip

    def __len__(self):
        return len(self.sampler) // self.batch_size + (len(self.sampler) % self.batch_size > 1)

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.skip <= i < len(self):
                yield batch


def encode(encoder, inputs):
    """(N, E) image embeddings from what a batch holds: pictures (N, 3, crop, crop), which go
    through the frozen ResNet, or its cached features (N, 2048), which skip it. The batch
    says which, so training and validation data of different kinds can never be mixed up."""
    return encoder.project(inputs) if inputs.dim() == 2 else encoder(inputs)


class TrainModel(nn.Module):
    """Encoder and decoder as one module, so DistributedDataParallel sees one forward.

    Inputs: inputs, captions, lengths
        * inputs: images (N, 3, crop, crop), or cached ResNet features (N, 2048)
        * captions, lengths: as DecoderRNN's
    Outputs: logits (sum(lengths), V)
    """

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, inputs, captions, lengths):
        return self.decoder(encode(self.encoder, inputs), captions, lengths)  # (sum(lengths), V)


# ---------------------------------------------------------------------------
# Data

def held_out(dataset, image_ids):
    """Indices of the dataset's captions whose image is in / not in `image_ids`."""
    item_images = dataset.item_image_ids()
    inside = [i for i, im in enumerate(item_images) if im in image_ids]
    outside = [i for i, im in enumerate(item_images) if im not in image_ids]
    return inside, outside


def make_datasets(args, vocab, encoder, spec, device, rank):
    """Training and validation datasets: pictures through the ResNet, or cached features.

    Returns (train_set, val_set); their items say themselves which they hold (see `encode`).
    Validation always sees the centre crop, so its features are cached unless
    --feature_cache off; training's are cached where --feature_cache says so.
    """
    deterministic = args.augment == 'none'
    cached = args.feature_cache == 'on' or (args.feature_cache == 'auto' and deterministic)
    views = 1 if deterministic else args.cache_views

    def feature_set(root, json, views, train):
        from feature_cache import FeatureCache, FeatureDataset  # imported only by runs that use it
        cache_dir = args.feature_cache_dir or os.path.join(os.path.dirname(os.path.normpath(root)), 'features')
        cache = FeatureCache(root=root, json=json, crop_size=args.crop_size, views=views, encoder_id=encoder_id(spec),
                             cache_dir=cache_dir, seed=args.seed, amp_dtype=amp_dtype(args))
        if rank == 0:  # one process fills the cache while the others wait, then all read it
            cache.load_or_build(encoder, device, batch_size=args.batch_size, num_workers=args.num_workers)
        if dist.is_initialized():
            dist.barrier()
        cache.load_or_build(encoder, device, batch_size=args.batch_size, num_workers=args.num_workers)
        return FeatureDataset(cache, vocab, seed=args.seed, train=train)

    def image_set(root, json, train):
        transform = image_transform(args.crop_size, train=train and not deterministic)
        return CocoDataset(root, json, vocab, transform, seed=args.seed)

    have_val = os.path.isfile(args.val_caption_path) and os.path.isdir(args.val_image_dir)
    if os.path.isfile(args.val_caption_path) and not have_val and rank == 0:
        print(f'note: {args.val_caption_path} is there but {args.val_image_dir} is not; holding out '
              f'{args.val_fraction:.0%} of the training images instead (python resize.py --image_dir '
              f'data/val2014 --output_dir {args.val_image_dir} to use val2014)')
    if cached:
        train_set = feature_set(args.image_dir, args.caption_path, views, train=True)
    else:
        train_set = image_set(args.image_dir, args.caption_path, train=True)
    if have_val:
        if args.feature_cache == 'off':
            val_set = image_set(args.val_image_dir, args.val_caption_path, train=False)
        else:
            val_set = feature_set(args.val_image_dir, args.val_caption_path, 1, train=False)
        return train_set, val_set

    # No validation set: hold out every k-th training picture with all its captions. Its
    # items come from the training source (no second cache), seen as at evaluation time.
    if cached:
        from feature_cache import FeatureDataset
        val_set = train_set if views == 1 else FeatureDataset(train_set.cache, vocab, seed=args.seed, train=False)
    else:
        val_set = train_set if deterministic else image_set(args.image_dir, args.caption_path, train=False)
    image_ids = sorted(set(train_set.item_image_ids()))
    val_ids = set(image_ids[::max(1, round(1 / args.val_fraction))])
    val_idx, train_idx = held_out(train_set, val_ids)
    return Subset(train_set, train_idx), Subset(val_set, val_idx)


def set_epoch(dataset, epoch):
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    base.set_epoch(epoch)


def amp_dtype(args):
    return {'off': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]


# ---------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, loader, device, args):
    """Mean cross-entropy per predicted token over the validation captions, and its exp."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for inputs, captions, lengths in loader:
        inputs, captions = inputs.to(device, non_blocking=True), captions.to(device, non_blocking=True)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        with torch.autocast(device.type, dtype=amp_dtype(args), enabled=args.amp != 'off'):
            total += criterion(model(inputs, captions, lengths).float(), targets)
        count += len(targets)
    model.train()
    total, count = all_sum(total.item(), count, device=device)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50))


@torch.no_grad()
def recalibrate_bn(model, loader, device, num_batches):
    """Re-estimate encoder.bn's running statistics as a plain average over a few training
    batches ("precise BN", https://arxiv.org/abs/2105.07576). With momentum 0.01 they need
    hundreds of steps to settle, which a short run never takes; a COCO run never calls this."""
    bn = model.encoder.bn
    bn.reset_running_stats()
    momentum, bn.momentum = bn.momentum, None  # None: cumulative average
    model.train()
    for i, (inputs, _, _) in enumerate(loader):
        if i == num_batches:
            break
        inputs = inputs.to(device)
        features = inputs if inputs.dim() == 2 else model.encoder.extract(inputs)  # (N, 2048)
        bn(model.encoder.linear(features))
    bn.momentum = momentum


# ---------------------------------------------------------------------------
# Checkpoints and logs

def rng_state():
    """Every random stream a step reads, as plain objects (weights_only-loadable)."""
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    np_state = state['numpy']
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def write_plot(history, path):
    """train_log.png: training and validation loss and perplexity against the step."""
    import matplotlib
    matplotlib.use('Agg')  # no display on the lab server
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], 'loss', 'loss'), (axes[1], 'perplexity', 'perplexity')):
        for split, style in (('train', '-'), ('val', 'o-')):
            rows = [r for r in history if r['split'] == split]
            ax.plot([r['global_step'] for r in rows], [r[key] for r in rows], style, label=split)
        ax.set_xlabel('step')
        ax.set_ylabel(label)
        ax.set_yscale('log' if key == 'perplexity' else 'linear')
        ax.legend()
    fig.tight_layout()
    tmp = path + '.tmp.png'
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_csv(history, path):
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['split', 'epoch', 'step', 'global_step', 'loss', 'perplexity',
                                               'steps_per_sec', 'time'])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = setup_distributed(args)
    master = rank == 0  # only rank 0 prints and writes
    if master:
        print(vars(args))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    # A random-weight ResNet's activations fall into float32's denormal range, where x86 CPUs
    # compute many times slower; flushing them to zero changes values by less than 1e-38
    torch.set_flush_denormal(True)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~8x the FP32 rate on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest convolutions

    try:
        vocab = load_vocab(args.vocab_path)
        spec = encoder_spec(args.encoder_weights, args.seed)
        encoder = build_encoder(args.embed_size, spec).to(device)
    except (FileNotFoundError, ValueError, EncoderWeightsError) as e:
        fail(e)
    if device.type == 'cuda':
        encoder.resnet.to(memory_format=torch.channels_last)  # NHWC: what tensor cores want
    if spec['source'] == 'none' and master:
        print('note: the encoder runs on random weights (--encoder_weights none): captions can only use what '
              'random convolutional features keep (colour, position, size, count)')
    decoder = DecoderRNN(args.embed_size, args.hidden_size, len(vocab), args.num_layers,
                         args.max_seq_length).to(device)

    try:
        train_set, val_set = make_datasets(args, vocab, encoder, spec, device, rank)
    except (OSError, ValueError) as e:  # missing pictures or captions, no room for the feature cache
        fail(e)
    model = TrainModel(encoder, decoder).train()
    ddp = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None) if world_size > 1 else model

    # Only the decoder and the encoder's linear and bn learn (the tutorial's choice)
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    # XXX: not fused=True, though it is ~6x faster on CPU: the fused kernel updates the weights
    # without bumping their version counters, which my_LSTM's inference cache of concatenated
    # weights relies on (https://pytorch.org/docs/stable/notes/autograd.html#in-place-correctness-checks)
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    criterion = nn.CrossEntropyLoss()

    start_epoch, start_step, global_step, best, history = 0, 0, 0, None, []
    if args.resume:
        try:
            ckpt = load_checkpoint(args.resume, map_location=device)
        except (FileNotFoundError, ValueError) as e:
            fail(f'--resume: {e}')
        encoder.load_state_dict(ckpt['encoder'], strict=False)
        decoder.load_state_dict(ckpt['decoder'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        start_epoch, start_step, global_step = ckpt['epoch'], ckpt['step'], ckpt['global_step']
        best, history = ckpt['best'], ckpt['history']
        set_rng_state(ckpt['rng'])
        if master:
            print(f'resumed from {args.resume}: epoch {start_epoch}, step {start_step}')

    # DistributedSampler also serves one process: its order is a function of (seed, epoch)
    # alone, which is what lets a resumed run see exactly the batches it would have seen
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    val_sampler = DistributedSampler(val_set, num_replicas=world_size, rank=rank, shuffle=False)
    loader_kw = dict(collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=device.type == 'cuda')
    # the validation loader lives through the run, so its workers can too; the training loader is
    # made anew each epoch (a resumed epoch starts at its batch), and its workers with it
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler,
                            persistent_workers=args.num_workers > 0, **loader_kw)
    total_step = len(EpochBatchSampler(sampler, args.batch_size))
    os.makedirs(args.model_path, exist_ok=True)
    latest = os.path.join(args.model_path, 'latest.pt')
    fingerprint = encoder.fingerprint()  # once: the ResNet is frozen

    def checkpoint(epoch, step):
        """Everything to continue from the batch after `step` of `epoch` (rank 0 writes)."""
        if not master:
            return
        save_checkpoint({'encoder': encoder_state(encoder), 'decoder': decoder.state_dict(),
                         'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                         'epoch': epoch, 'step': step, 'global_step': global_step, 'best': best,
                         'best_val_loss': best['val_loss'] if best else None,
                         'history': history, 'rng': rng_state(), 'vocab': vocab.words(), 'args': vars(args),
                         'encoder_weights': spec, 'encoder_fingerprint': fingerprint}, latest)

    # Ctrl-C and SIGTERM (a cluster's preemption) save latest.pt and leave cleanly
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)

    # position: how many batches of the current epoch have been trained on
    epoch, position, plotted = start_epoch, start_step, 0.0
    try:
        for epoch in range(start_epoch, args.num_epochs):
            sampler.set_epoch(epoch)
            set_epoch(train_set, epoch)
            position = start_step if epoch == start_epoch else 0
            # its own generator, so making an iterator never draws from the global random stream
            loader = DataLoader(train_set, batch_sampler=EpochBatchSampler(sampler, args.batch_size, position),
                                generator=torch.Generator().manual_seed(args.seed + epoch), **loader_kw)
            bar = tqdm(total=total_step, initial=position, desc=f'epoch {epoch}/{args.num_epochs}',
                       disable=not master or None, leave=False, dynamic_ncols=True)
            tic, tic_position = time.time(), position
            for step, (inputs, captions, lengths) in enumerate(loader, start=position):
                inputs = inputs.to(device, non_blocking=True)
                if inputs.dim() == 4 and device.type == 'cuda':
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                captions = captions.to(device, non_blocking=True)
                targets = pack_padded_sequence(captions, lengths, batch_first=True).data
                with torch.autocast(device.type, dtype=amp_dtype(args), enabled=args.amp != 'off'):
                    outputs = ddp(inputs, captions, lengths)
                    loss = criterion(outputs.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                position, global_step = step + 1, global_step + 1
                bar.update(1)

                if step % args.log_step == 0:  # the only host sync of a step: .item()
                    loss_value = loss.item()
                    rate = (position - tic_position) / (time.time() - tic)
                    ppl = float(np.exp(loss_value))
                    bar.set_postfix(loss=f'{loss_value:.4f}', ppl=f'{ppl:.2f}', steps_per_s=f'{rate:.2f}')
                    if master:
                        tqdm.write('Epoch [{}/{}], Step [{}/{}], Loss: {:.4f}, Perplexity: {:5.4f}'.format(
                            epoch, args.num_epochs, step, total_step, loss_value, ppl))
                    history.append({'split': 'train', 'epoch': epoch, 'step': step, 'global_step': global_step,
                                    'loss': loss_value, 'perplexity': ppl, 'steps_per_sec': rate,
                                    'time': time.time()})
                if position % args.save_step == 0:
                    checkpoint(epoch, position)
                if args.dry_run or global_step == args.max_steps:
                    break
            bar.close()

            # end of the epoch (or of a short run): validate, keep the best, log
            if args.recalibrate_bn:
                recalibrate_bn(model, loader, device, args.recalibrate_bn)
            val_loss, val_ppl = evaluate(model, val_loader, device, args)
            score = select_score(args, model, val_set, vocab, device, val_loss)
            improved = best is None or score > best['score']
            if improved:
                best = {'score': score, 'val_loss': val_loss, 'epoch': epoch, 'global_step': global_step}
            history.append({'split': 'val', 'epoch': epoch, 'step': position, 'global_step': global_step,
                            'loss': val_loss, 'perplexity': val_ppl, 'steps_per_sec': '', 'time': time.time()})
            if master:
                extra = f', {args.select_by}: {score:.2f}' if args.select_by != 'loss' else ''
                print(f'Validation after epoch [{epoch}/{args.num_epochs}]: Loss: {val_loss:.4f}, '
                      f'Perplexity: {val_ppl:5.4f}{extra}{" (best)" if improved else ""}')
            finished = position >= total_step
            checkpoint(epoch + 1 if finished else epoch, 0 if finished else position)
            if master:
                if improved:  # copy, then rename: best.pt is never half-written either
                    best_path = os.path.join(args.model_path, 'best.pt')
                    shutil.copyfile(latest, best_path + '.tmp')
                    os.replace(best_path + '.tmp', best_path)
                write_csv(history, os.path.join(args.model_path, 'train_log.csv'))
                # the plot each epoch, but at most every 30 s: a toy set's epochs take a second
                last = epoch == args.num_epochs - 1 or args.dry_run or global_step == args.max_steps
                if last or time.time() - plotted > 30:
                    write_plot(history, os.path.join(args.model_path, 'train_log.png'))
                    plotted = time.time()
            if args.dry_run or global_step == args.max_steps:
                break
    except KeyboardInterrupt:
        # a batch in flight is redone on resume; finished ones are not
        checkpoint(epoch, position)
        if master:
            print(f'\ninterrupted: saved {latest} at epoch {epoch}, step {position}; '
                  f'continue with --resume {latest}')
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(130)
    if master:
        print(f'saved {latest} and {os.path.join(args.model_path, "best.pt")}')
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


@torch.no_grad()
def select_score(args, model, val_set, vocab, device, val_loss):
    """The number best.pt maximises: minus the validation loss, or a caption score (0-100)
    of greedy captions for the first --select_subset validation pictures."""
    if args.select_by == 'loss':
        return -val_loss
    import metrics
    from evaluate import caption_features  # only runs with --select_by bleu4/cider
    base, indices = (val_set.dataset, val_set.indices) if isinstance(val_set, Subset) else (val_set, range(len(val_set)))
    item_images, first = base.item_image_ids(), {}
    for i in indices:  # one item per picture: its first caption's
        first.setdefault(item_images[i], i)
    image_ids = sorted(first)[:args.select_subset]
    coco = base.coco if isinstance(base, CocoDataset) else base.cache.coco
    references = {i: [a['caption'] for a in coco.imgToAnns[i]] for i in image_ids}
    model.eval()
    captions = []
    for start in range(0, len(image_ids), args.batch_size):
        inputs = torch.stack([base[first[i]][0] for i in image_ids[start:start + args.batch_size]]).to(device)
        features = encode(model.encoder, inputs)
        captions += caption_features(model.decoder, features, vocab)
    model.train()
    score = metrics.bleu4 if args.select_by == 'bleu4' else metrics.cider_d
    return score(references, dict(zip(image_ids, captions)))


if __name__ == '__main__':
    main()
