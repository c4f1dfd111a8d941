"""Train the captioning model: only the decoder and the encoder's linear and bn learn.

    $ python train.py                      # MS-COCO 2014 under data/, the tutorial's defaults
    $ torchrun --nproc_per_node=4 train.py --amp bf16 --augment none   # 4 GPUs, cached features

Prints the lab's line every --log_step steps:
    Epoch [0/5], Step [0/3236], Loss: 9.2050, Perplexity: 9947.2122
and writes into --model_path: latest.pt (every --save_step steps, each epoch and on Ctrl-C),
best.pt (lowest validation loss, or best caption score with --select_by), train_log.csv,
train_log.png, and, while it runs, train.lock (its pid: one run at a time in a folder).
--resume models/latest.pt continues exactly where it left off, after Ctrl-C or SIGTERM too.
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import contextlib
import csv
import glob
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
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from checkpoint import (DECODERS, EncoderWeightsError, build_decoder, build_encoder, encoder_id, encoder_spec,
                        encoder_state, grid_size, load_checkpoint, load_ours, save_checkpoint)
from data_loader import CocoDataset, collate_fn, image_transform, worker_init_fn
from model import AttentionDecoder
from progress import progress as show_progress, rank_zero  # train.py's Progress is the run's position
from utils import HelpFormatter, atomic_write, fail, pid_alive, remove_stale_temporaries, why_not_writable
from vocab import load_vocab

try:  # the lock that keeps two runs out of one --model_path (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows: keeping runs apart is up to the user
    fcntl = None

PROG = 'train.py'
ARCHITECTURE = ('embed_size', 'hidden_size', 'num_layers', 'decoder', 'grid_size')  # what the saved weights' shapes fix


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
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
    parser.add_argument('--decoder', type=str, default='rnn', choices=DECODERS,
                        help="the tutorial's DecoderRNN, or Show, Attend and Tell's attention over image regions")
    parser.add_argument('--grid_size', type=int, default=7,
                        help='--decoder attention: the ResNet map pooled to G x G regions (at most crop_size/32)')
    parser.add_argument('--attention_penalty', type=float, default=0.1,
                        help="--decoder attention: lambda of the doubly stochastic penalty on the attention weights")
    parser.add_argument('--encoder_weights', type=str, default='imagenet',
                        help="frozen ResNet-152 weights: 'imagenet', 'none' (random, seeded by --seed) or a path")
    # optimisation
    parser.add_argument('--num_epochs', type=int, default=5, help='passes over the training captions')
    parser.add_argument('--batch_size', type=int, default=128, help='captions per step, per GPU under torchrun')
    parser.add_argument('--num_workers', type=int, default=2, help='data loading processes (per GPU)')
    parser.add_argument('--learning_rate', type=float, default=0.001, help="Adam's step size")
    # speed
    parser.add_argument('--augment', type=str, default='crop_flip', choices=['crop_flip', 'none'],
                        help="training crops: the tutorial's random crop and flip, or the centre crop")
    parser.add_argument('--feature_cache', type=str, default='auto', choices=['auto', 'on', 'off'],
                        help='run the frozen ResNet once per image and reuse its features; auto: wherever '
                             'that changes nothing but speed (validation, and training with --augment none)')
    parser.add_argument('--cache_views', type=int, default=5,
                        help='with --feature_cache on and --augment crop_flip: random crops cached per image')
    parser.add_argument('--feature_cache_dir', type=str, default=None,
                        help='where cached features go; not given: features/ beside --image_dir')
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
    parser.add_argument('--seed', type=int, default=0,
                        help='seeds the weights, the shuffling, the crops and (with --encoder_weights none) the ResNet')
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="'cpu', 'cuda', 'cuda:1', 'mps'; under torchrun each process takes cuda:LOCAL_RANK")
    args = parser.parse_args(argv)
    for name in ('log_step', 'save_step', 'batch_size', 'num_epochs', 'cache_views', 'select_subset', 'crop_size',
                 'image_size', 'embed_size', 'hidden_size', 'num_layers', 'max_seq_length'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    for name in ('num_workers', 'recalibrate_bn', 'max_steps'):
        if getattr(args, name) < 0:
            parser.error(f'--{name} must be 0 or more, got {getattr(args, name)}')
    if not 0 < args.learning_rate < math.inf:
        parser.error(f'--learning_rate must be a positive number, got {args.learning_rate}')
    if not 0 < args.val_fraction < 1:
        parser.error(f'--val_fraction must be in (0, 1), got {args.val_fraction}')
    if args.crop_size > args.image_size:
        parser.error(f'--crop_size {args.crop_size} is larger than --image_size {args.image_size}')
    why = attention_args_problem(args)
    if why:
        parser.error(why)
    return args


def attention_args_problem(args):
    """What is wrong with --decoder attention's flags (one line), or None."""
    if args.decoder != 'attention':
        return None
    map_size = math.ceil(args.crop_size / 32)  # the ResNet's last map is the crop downsampled 32 times
    if not 1 <= args.grid_size <= map_size:
        return (f'--grid_size must be from 1 to {map_size} (the ResNet map of a {args.crop_size} crop is '
                f'{map_size} x {map_size}), got {args.grid_size}')
    if args.num_layers != 1:
        return f'--decoder attention steps one LSTM cell: --num_layers must be 1, got {args.num_layers}'
    if not 0 <= args.attention_penalty < math.inf:
        return f'--attention_penalty must be 0 or more, got {args.attention_penalty}'
    return None


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
    """(N, E) image embeddings, or (N, R, E) regions, from what a batch holds: pictures (N, 3,
    crop, crop), which go through the frozen ResNet, or its cached features (N, 2048) or
    (N, R, 2048), which skip it. The batch says which, so training and validation data of
    different kinds can never be mixed up."""
    return encoder.project(inputs) if inputs.dim() < 4 else encoder(inputs)


class TrainModel(nn.Module):
    """Encoder and decoder as one module, so DistributedDataParallel sees one forward.

    Inputs: inputs, captions, lengths
        * inputs: images (N, 3, crop, crop), or cached ResNet features (N, 2048) or (N, R, 2048)
        * captions, lengths: as DecoderRNN's
    Outputs: logits (sum(lengths), V), and penalty: the attention's doubly stochastic penalty
        (a scalar tensor) for AttentionDecoder, None for DecoderRNN
    """

    def __init__(self, encoder, decoder, attention_penalty=0.0):
        super().__init__()
        self.encoder, self.decoder, self.attention_penalty = encoder, decoder, attention_penalty

    def forward(self, inputs, captions, lengths):
        features = encode(self.encoder, inputs)
        if isinstance(self.decoder, AttentionDecoder):
            logits, alphas = self.decoder(features, captions, lengths, return_alphas=True)
            return logits, self.decoder.doubly_stochastic(alphas, lengths, self.attention_penalty)
        return self.decoder(features, captions, lengths), None  # (sum(lengths), V)


# ---------------------------------------------------------------------------
# Data

def held_out(dataset, image_ids):
    """Indices of the dataset's captions whose image is in / not in `image_ids`."""
    item_images = dataset.item_image_ids()
    inside = [i for i, im in enumerate(item_images) if im in image_ids]
    outside = [i for i, im in enumerate(item_images) if im not in image_ids]
    return inside, outside


def feature_set(args, root, json, views, train, vocab, encoder, spec, device, rank):
    """A FeatureDataset over the cache of (root, json): rank 0 fills the cache while the
    others wait, then all read it."""
    from feature_cache import FeatureCache, FeatureDataset  # imported only by runs that use it
    cache_dir = args.feature_cache_dir or os.path.join(os.path.dirname(os.path.normpath(root)), 'features')
    cache = FeatureCache(root=root, json=json, crop_size=args.crop_size, views=views, encoder_id=encoder_id(spec),
                         cache_dir=cache_dir, seed=args.seed, amp_dtype=amp_dtype(args))
    if rank == 0:
        cache.load_or_build(encoder, device, batch_size=args.batch_size, num_workers=args.num_workers)
    if dist.is_initialized():
        dist.barrier()
    cache.load_or_build(encoder, device, batch_size=args.batch_size, num_workers=args.num_workers)
    return FeatureDataset(cache, vocab, seed=args.seed, train=train)


def image_set(args, root, json, train, vocab):
    """A CocoDataset of pictures: the tutorial's random crop and flip, or the centre crop."""
    transform = image_transform(args.crop_size, train=train and args.augment != 'none')
    return CocoDataset(root, json, vocab, transform, seed=args.seed)


def make_datasets(args, vocab, encoder, spec, device, rank):
    """Training and validation datasets: pictures through the ResNet, or cached features.

    Returns (train_set, val_set); their items say themselves which they hold (see `encode`).
    Validation always sees the centre crop, so its features are cached unless
    --feature_cache off; training's are cached where --feature_cache says so.
    """
    deterministic = args.augment == 'none'
    cached = args.feature_cache == 'on' or (args.feature_cache == 'auto' and deterministic)
    views = 1 if deterministic else args.cache_views
    have_val = os.path.isfile(args.val_caption_path) and os.path.isdir(args.val_image_dir)
    if os.path.isfile(args.val_caption_path) and not have_val and rank == 0:
        print(f'note: {args.val_caption_path} is there but {args.val_image_dir} is not; holding out '
              f'{args.val_fraction:.0%} of the training images instead (python resize.py --image_dir '
              f'data/val2014 --output_dir {args.val_image_dir} to use val2014)')
    if cached:
        train_set = feature_set(args, args.image_dir, args.caption_path, views, True, vocab, encoder, spec, device, rank)
    else:
        train_set = image_set(args, args.image_dir, args.caption_path, True, vocab)
    if have_val:
        if args.feature_cache == 'off':
            val_set = image_set(args, args.val_image_dir, args.val_caption_path, False, vocab)
        else:
            val_set = feature_set(args, args.val_image_dir, args.val_caption_path, 1, False, vocab, encoder, spec,
                                  device, rank)
        return train_set, val_set

    # No validation set: hold out every k-th training picture with all its captions. Its
    # items come from the training source (no second cache), seen as at evaluation time.
    if cached:
        from feature_cache import FeatureDataset
        val_set = train_set if views == 1 else FeatureDataset(train_set.cache, vocab, seed=args.seed, train=False)
    else:
        val_set = train_set if deterministic else image_set(args, args.image_dir, args.caption_path, False, vocab)
    image_ids = sorted(set(train_set.item_image_ids()))
    val_ids = set(image_ids[::max(1, round(1 / args.val_fraction))])
    val_idx, train_idx = held_out(train_set, val_ids)
    return Subset(train_set, train_idx), Subset(val_set, val_idx)


def set_epoch(dataset, epoch):
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    base.set_epoch(epoch)


def amp_dtype(args):
    return {'off': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]


def make_loaders(args, train_set, val_set, world_size, rank, device):
    """(train sampler, validation loader, loader keyword arguments for each epoch's loader).

    DistributedSampler also serves one process: its order is a function of (seed, epoch)
    alone, which is what lets a resumed run see exactly the batches it would have seen."""
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    val_pictures = PictureCaptions(val_set, trial_pictures(args))  # validation batches are pictures
    val_sampler = DistributedSampler(val_pictures, num_replicas=world_size, rank=rank, shuffle=False)
    loader_kw = dict(collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=device.type == 'cuda',
                     worker_init_fn=worker_init_fn)
    # the validation loader lives through the run, so its workers can too; the training loader is
    # made anew each epoch (a resumed epoch starts at its batch), and its workers with it
    # its own generator too: each pass would otherwise draw its workers' base seed from the global
    # random stream, and a run validated mid-epoch (--max_steps) would resume on other dropout masks
    val_loader = DataLoader(val_pictures, batch_size=args.batch_size, sampler=val_sampler,
                            persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed),
                            **dict(loader_kw, collate_fn=collate_pictures))
    return sampler, val_loader, loader_kw


# ---------------------------------------------------------------------------
# Model and optimiser

def build_model(args, vocab, device, master):
    """(encoder, decoder, spec): the frozen ResNet-152 + trainable head, and the decoder."""
    try:
        spec = encoder_spec(args.encoder_weights, args.seed)
        encoder = build_encoder(args.embed_size, spec).to(device)
        encoder.grid_size = grid_size(vars(args))
    except (FileNotFoundError, ValueError, EncoderWeightsError) as e:
        fail(PROG, e)
    if device.type == 'cuda':
        encoder.resnet.to(memory_format=torch.channels_last)  # NHWC: what tensor cores want
    if spec['source'] == 'none' and master:
        print('note: the encoder runs on random weights (--encoder_weights none): captions can only use what '
              'random convolutional features keep (colour, position, size, count)')
    decoder = build_decoder(vars(args), len(vocab)).to(device)
    return encoder, decoder, spec


def make_optimizer(args, encoder, decoder, device):
    """Adam over what learns, the decoder and the encoder's linear and bn (the tutorial's
    choice), and the fp16 gradient scaler (a no-op otherwise)."""
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    # fused: one kernel for all parameters instead of a few small ones per parameter
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, fused=device.type in ('cpu', 'cuda'))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    return optimizer, scaler


# ---------------------------------------------------------------------------
# Stopping: Ctrl-C and SIGTERM (a cluster's preemption)

class StopSignals:
    """Ctrl-C and SIGTERM stop the run within about a second.

    Where the model changes, a training step or a checkpoint being written (inside `deferred()`),
    the first signal is only recorded: the loop stops at the next batch boundary, and a write
    finishes. A batch cut in half would have updated the BatchNorm statistics, or the weights,
    that its redoing on resume updates again. Anywhere else (setting up, the feature cache,
    validation, scoring) it raises KeyboardInterrupt at once: nothing there changes what a
    checkpoint holds. A second signal always raises at once."""

    def __init__(self):
        self.signals, self.deferring = 0, False
        self.previous = signal.signal(signal.SIGINT, self), signal.signal(signal.SIGTERM, self)

    @property
    def requested(self):
        return self.signals > 0

    def restore(self):
        """Give the caller (demo.py runs main() in its own process) its handlers back."""
        signal.signal(signal.SIGINT, self.previous[0])
        signal.signal(signal.SIGTERM, self.previous[1])

    def __call__(self, signum, frame):
        self.signals += 1
        if not (self.deferring and self.signals == 1):
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Within the block, a first signal is only recorded."""
        before, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = before

    def stop_now(self, device):
        """True when any process got a signal (all of them stop at the same batch)."""
        if dist.is_initialized() and all_sum(float(self.requested), device=device)[0] > 0:
            self.signals = max(self.signals, 1)
        return self.requested


# ---------------------------------------------------------------------------
# One epoch, validation

def train_one_epoch(ddp, loader, optimizer, scaler, progress, args, device, stop, master):
    """Train on the loader's batches, from batch progress.step of progress.epoch on (progress.step
    counts the batches done). Returns why it ended: 'done' (the epoch), 'limit' (--dry_run,
    --max_steps) or 'stop' (Ctrl-C or SIGTERM, at a batch boundary)."""
    criterion = nn.CrossEntropyLoss()
    epoch, total_step = progress.epoch, len(loader.batch_sampler)
    bar = tqdm(total=total_step, initial=progress.step, desc=f'epoch {epoch}/{args.num_epochs}',
               disable=not master or None, leave=False, dynamic_ncols=True)
    tic, tic_position = time.time(), progress.step
    for step, (inputs, captions, lengths) in enumerate(loader, start=progress.step):
        inputs = inputs.to(device, non_blocking=True)
        if inputs.dim() == 4 and device.type == 'cuda':
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        captions = captions.to(device, non_blocking=True)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        with torch.autocast(device.type, dtype=amp_dtype(args), enabled=args.amp != 'off'):
            logits, penalty = ddp(inputs, captions, lengths)
            loss = criterion(logits.float(), targets)  # the lab's Loss: cross-entropy per word
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss if penalty is None else loss + penalty).backward()
        scaler.step(optimizer)
        scaler.update()
        progress.step, progress.global_step = step + 1, progress.global_step + 1
        bar.update(1)

        if step % args.log_step == 0:  # the only host sync of a step: .item()
            loss_value = loss.item()
            rate = (progress.step - tic_position) / (time.time() - tic)
            ppl = float(np.exp(loss_value))
            bar.set_postfix(loss=f'{loss_value:.4f}', ppl=f'{ppl:.2f}', steps_per_s=f'{rate:.2f}')
            if master:
                tqdm.write('Epoch [{}/{}], Step [{}/{}], Loss: {:.4f}, Perplexity: {:5.4f}'.format(
                    epoch, args.num_epochs, step, total_step, loss_value, ppl))
            progress.history.append({'split': 'train', 'epoch': epoch, 'step': step,
                                     'global_step': progress.global_step, 'loss': loss_value, 'perplexity': ppl,
                                     'steps_per_sec': rate, 'time': time.time()})
        if progress.step % args.save_step == 0 and master:
            save(progress.latest, progress.checkpoint())
        if stop.stop_now(device):
            bar.close()
            return 'stop'
        if args.dry_run or progress.global_step == args.max_steps:
            bar.close()
            return 'limit'
    bar.close()
    return 'done'


class PictureCaptions(Dataset):
    """Validation items, one per picture with all its captions, so that the frozen ResNet runs
    once per picture rather than once per caption (COCO has 5 captions a picture).

    Args:
        dataset: CocoDataset or FeatureDataset (with centre crops), or a Subset of one
        limit: keep only the first this many pictures (a trial run's short validation). Default: None

    Outputs: input, captions
        * input: the picture (3, crop, crop), or its cached feature (2048,)
        * captions: list of LongTensors (L_i,), the picture's captions, in item order
    """

    def __init__(self, dataset, limit=None):
        base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) \
            else (dataset, range(len(dataset)))
        item_images, groups = base.item_image_ids(), {}
        for i in indices:
            groups.setdefault(item_images[i], []).append(i)
        self.base, self.groups, self.available = base, list(groups.values())[:limit], len(groups)

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, index):
        items = self.groups[index]
        return self.base[items[0]][0], [self.base.caption(i) for i in items]


def collate_pictures(data):
    """Batch PictureCaptions items: every caption with the position of its picture.

    Returns:
        inputs: (P, 3, H, W) pictures or (P, D) features
        owner: LongTensor (N,): caption n belongs to inputs[owner[n]]
        targets, lengths: as collate_fn's, longest caption first
    where: P = pictures in the batch, N = their captions
    """
    inputs = torch.stack([item[0] for item in data])
    owner, targets, lengths = collate_fn([(torch.tensor(p), c) for p, (_, captions) in enumerate(data)
                                          for c in captions])
    return inputs, owner, targets, lengths


def trial_pictures(args):
    """How many validation pictures a trial run (--dry_run, --max_steps) validates on: about
    one per 5 captions it trains on, so that validating takes no longer than training did;
    None (all of them) for a real run."""
    steps = 1 if args.dry_run else args.max_steps
    return max(1, steps * args.batch_size // 5) if steps else None


@torch.no_grad()
def validate(model, loader, device, args):
    """Mean cross-entropy per predicted token over the validation captions, and its exp.

    `loader` yields collate_pictures batches: each picture is encoded once, and its embedding
    goes with each of its captions."""
    pictures = loader.dataset
    if len(pictures) < pictures.available and rank_zero():
        print(f'validating on the first {len(pictures)} of {pictures.available} validation pictures '
              f'(a trial run: --dry_run or --max_steps)', flush=True)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    with show_progress(total=len(loader.sampler), desc='validating', unit='pictures') as bar:
        for inputs, owner, captions, lengths in loader:
            inputs, captions = inputs.to(device, non_blocking=True), captions.to(device, non_blocking=True)
            targets = pack_padded_sequence(captions, lengths, batch_first=True).data
            with torch.autocast(device.type, dtype=amp_dtype(args), enabled=args.amp != 'off'):
                features = encode(model.encoder, inputs)[owner.to(device)]  # (P, E) -> (N, E)
                total += criterion(model.decoder(features, captions, lengths).float(), targets)
            count += len(targets)
            bar.update(len(inputs))
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
    try:
        with show_progress(total=min(num_batches, len(loader)), desc='recalibrating bn', unit='batches') as bar:
            for i, (inputs, _, _) in enumerate(loader):
                if i == num_batches:
                    break
                inputs = inputs.to(device)
                features = inputs if inputs.dim() < 4 else model.encoder.extract(inputs)  # (N, 2048) or (N, R, 2048)
                model.encoder.project(features)
                bar.update(1)
    finally:
        bn.momentum = momentum


@torch.no_grad()
def select_score(args, model, val_set, vocab, device, val_loss):
    """The number best.pt maximises: minus the validation loss, or a caption score (0-100)
    of greedy captions for the first --select_subset validation pictures."""
    if args.select_by == 'loss':
        return -val_loss
    import metrics
    base, indices = (val_set.dataset, val_set.indices) if isinstance(val_set, Subset) else (val_set, range(len(val_set)))
    item_images, first = base.item_image_ids(), {}
    for i in indices:  # one item per picture: its first caption's
        first.setdefault(item_images[i], i)
    image_ids = sorted(first)[:args.select_subset]
    coco = base.coco if isinstance(base, CocoDataset) else base.cache.coco
    references = {i: [a['caption'] for a in coco.imgToAnns[i]] for i in image_ids}
    model.eval()
    captions = []
    with show_progress(total=len(image_ids), desc=f'captioning for --select_by {args.select_by}',
                       unit='pictures') as bar:
        for start in range(0, len(image_ids), args.batch_size):
            inputs = torch.stack([base[first[i]][0] for i in image_ids[start:start + args.batch_size]]).to(device)
            ids = model.decoder.generate(encode(model.encoder, inputs))
            captions += [vocab.decode(c, markers=False) for c in ids]
            bar.update(len(ids))
    model.train()
    score = metrics.bleu4 if args.select_by == 'bleu4' else metrics.cider_d
    return score(references, dict(zip(image_ids, captions)), verbose=rank_zero())


# ---------------------------------------------------------------------------
# Progress, checkpoints and logs

class Progress:
    """Where the run is, and what a checkpoint of it holds.

    epoch: the epoch being trained; step: how many of its batches are done; global_step:
    batches done in all; best: the best validation so far ({'score', 'val_loss', 'epoch',
    'global_step'}) or None; history: the rows of train_log.csv."""

    def __init__(self, args, model, optimizer, scaler, vocab, spec):
        self.args, self.model, self.optimizer, self.scaler, self.vocab, self.spec = \
            args, model, optimizer, scaler, vocab, spec
        self.epoch, self.step, self.global_step, self.best, self.history = 0, 0, 0, None, []
        self.latest = os.path.join(args.model_path, 'latest.pt')
        self.best_path = os.path.join(args.model_path, 'best.pt')
        self.fingerprint = model.encoder.fingerprint()  # once: the ResNet is frozen

    def checkpoint(self):
        """Everything to continue from the batch after `step` of `epoch`: a dict of plain objects."""
        encoder, decoder = self.model.encoder, self.model.decoder
        return {'encoder': encoder_state(encoder), 'decoder': decoder.state_dict(),
                'optimizer': self.optimizer.state_dict(), 'scaler': self.scaler.state_dict(),
                'epoch': self.epoch, 'step': self.step, 'global_step': self.global_step, 'best': self.best,
                'best_val_loss': self.best['val_loss'] if self.best else None,
                'history': self.history, 'rng': rng_state(), 'vocab': self.vocab.words(), 'args': vars(self.args),
                'encoder_weights': self.spec, 'encoder_fingerprint': self.fingerprint}

    def restore(self, ckpt):
        """Put the model, optimiser, scaler, position and random streams back as `ckpt` has them."""
        self.model.encoder.load_state_dict(ckpt['encoder'], strict=False)
        self.model.decoder.load_state_dict(ckpt['decoder'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.scaler.load_state_dict(ckpt['scaler'])
        self.epoch, self.step, self.global_step = ckpt['epoch'], ckpt['step'], ckpt['global_step']
        self.best, self.history = ckpt['best'], ckpt['history']
        set_rng_state(ckpt['rng'])


def rng_state():
    """Every random stream a step reads, as plain objects (weights_only-loadable)."""
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        # this process's own GPU only: under torchrun every rank draws the same stream on its
        # own device, and a resume on another number of GPUs restores it just the same
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'].cpu())
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    np_state = state['numpy']
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())


def cannot_write(path, e):
    """Stop with one line: the file that could not be written, and what is still on disk."""
    reason = e.strerror or str(e) if isinstance(e, OSError) else str(e)
    kept = (f'the previous {path} is intact' if os.path.exists(path) else 'nothing was saved under that name')
    latest = os.path.join(os.path.dirname(path), 'latest.pt')
    then = f'continue with --resume {latest}' if os.path.exists(latest) else 'start again'
    fail(PROG, f'cannot write {path} ({reason}); {kept}. Free some space (or pass another --model_path) and {then}')


def save(path, ckpt):
    """Write a checkpoint atomically; a full disk stops the run with one line."""
    try:
        save_checkpoint(ckpt, path)
    except OSError as e:
        cannot_write(path, e)


def copy_file(source, path):
    """Copy through utils.atomic_write: `path` is the old file or the whole new one."""
    try:
        with open(source, 'rb') as f, atomic_write(path) as out:
            shutil.copyfileobj(f, out, 1 << 20)
    except OSError as e:
        cannot_write(path, e)


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
    try:
        with atomic_write(path, fsync=False) as f:
            fig.savefig(f, format='png')
    except OSError as e:
        cannot_write(path, e)
    finally:
        plt.close(fig)


def write_csv(history, path):
    try:
        with atomic_write(path, 'w', fsync=False, newline='') as f:
            writer = csv.DictWriter(f, fieldnames=['split', 'epoch', 'step', 'global_step', 'loss', 'perplexity',
                                                   'steps_per_sec', 'time'])
            writer.writeheader()
            writer.writerows(history)
    except OSError as e:
        cannot_write(path, e)


def end_of_epoch(model, train_loader, val_loader, val_set, progress, args, device, master, stop, plotted):
    """Validate, keep the best, save latest.pt (and best.pt), write the logs. train_loader gives
    the epoch's batches from its first. A signal stops the validation at once, and lets the
    files be written whole. Returns the time of the last plot."""
    if args.recalibrate_bn:
        recalibrate_bn(model, train_loader, device, args.recalibrate_bn)
    val_loss, val_ppl = validate(model, val_loader, device, args)
    score = select_score(args, model, val_set, progress.vocab, device, val_loss)
    with stop.deferred():  # validation and scoring may be cut short; what follows is written whole
        epoch = progress.epoch
        improved = progress.best is None or score > progress.best['score']
        if improved:
            progress.best = {'score': score, 'val_loss': val_loss, 'epoch': epoch, 'global_step': progress.global_step}
        progress.history.append({'split': 'val', 'epoch': epoch, 'step': progress.step,
                                 'global_step': progress.global_step, 'loss': val_loss, 'perplexity': val_ppl,
                                 'steps_per_sec': '', 'time': time.time()})
        if progress.step >= len(train_loader.batch_sampler):  # the epoch is done: the next one starts at 0
            progress.epoch, progress.step = epoch + 1, 0
        if not master:
            return plotted
        extra = f', {args.select_by}: {score:.2f}' if args.select_by != 'loss' else ''
        print(f'Validation after epoch [{epoch}/{args.num_epochs}]: Loss: {val_loss:.4f}, '
              f'Perplexity: {val_ppl:5.4f}{extra}{" (best)" if improved else ""}')
        save(progress.latest, progress.checkpoint())
        if improved:
            copy_file(progress.latest, progress.best_path)
        write_csv(progress.history, os.path.join(args.model_path, 'train_log.csv'))
        # the plot each epoch, but at most every 30 s: a toy set's epochs take a second
        last = epoch == args.num_epochs - 1 or args.dry_run or progress.global_step == args.max_steps
        if last or time.time() - plotted > 30:
            write_plot(progress.history, os.path.join(args.model_path, 'train_log.png'))
            plotted = time.time()
    return plotted


# ---------------------------------------------------------------------------
# Before training: the model folder, the checkpoint to resume

def claim_model_path(model_path):
    """Make sure --model_path is writable and used by this run alone, and clear what killed
    runs left there. Returns the lock file, locked until release_model_path() removes it or the
    process ends (the kernel drops the lock of a killed run, so its lock file is taken over)."""
    lock_path = os.path.join(model_path, 'train.lock')
    why = why_not_writable(model_path)
    try:
        if why is None:
            os.makedirs(model_path, exist_ok=True)
    except OSError as e:
        why = e.strerror or str(e)
    if why:
        fail(PROG, f'cannot write in --model_path {model_path} ({why}): pass a folder you can write to')
    while True:
        lock = open(lock_path, 'a+')
        lock.seek(0)
        holder = lock.read().strip()
        if fcntl is None:
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(PROG, f'--model_path {model_path} is in use by another train.py run (pid {holder or "?"}, '
                       f'{lock_path}): wait for it to end, or pass another --model_path')
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        lock.close()  # its run removed the file between our open and our lock: open the new one
    if holder.isdigit() and int(holder) != os.getpid() and not pid_alive(int(holder)):
        print(f'note: {lock_path} was left by train.py pid {holder}, which is no longer running: taken over')
    lock.seek(0)
    lock.truncate()
    lock.write(f'{os.getpid()}\n')
    lock.flush()
    removed = remove_stale_temporaries(model_path)
    # the temporary names of train.py versions before utils.atomic_write
    for pattern in ('latest.pt.*.tmp', 'best.pt.tmp', 'train_log.csv.tmp', 'train_log.png.tmp.png'):
        for path in glob.glob(os.path.join(model_path, pattern)):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(os.path.basename(path))
    if removed:
        print(f'note: removed {len(removed)} temporary file(s) of an interrupted save from {model_path}: '
              f'{", ".join(sorted(removed))}')
    return lock


def release_model_path(lock):
    """Remove the lock file while still holding it, so that only a run that died leaves one."""
    if lock is not None:
        with contextlib.suppress(OSError):
            os.remove(lock.name)
        lock.close()


def load_resume(args):
    """The checkpoint --resume names, after taking the model's sizes from it (the weights
    only fit those); stops with one line when it cannot be resumed from."""
    try:
        ckpt = load_ours(args.resume)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, f'--resume: {e}')
    missing = [k for k in ('optimizer', 'scaler', 'rng', 'history', 'epoch', 'step', 'global_step') if k not in ckpt]
    if missing:
        fail(PROG, f'--resume: {args.resume} has no {", ".join(missing)}, which continuing needs: '
                   f'pass a latest.pt or best.pt that train.py wrote')
    changed = [f'--{name} {ckpt["args"][name]} (not {getattr(args, name)})' for name in ARCHITECTURE
               if ckpt['args'].get(name, getattr(args, name)) != getattr(args, name)]
    for name in ARCHITECTURE:
        setattr(args, name, ckpt['args'].get(name, getattr(args, name)))
    if changed:
        print(f'note: --resume: {args.resume} was trained with {", ".join(changed)}; continuing with its sizes')
    if attention_args_problem(args):
        fail(PROG, f'--resume: {args.resume} holds an attention decoder: {attention_args_problem(args)}')
    return ckpt


def check_resume_vocab(ckpt, args, vocab):
    """Refuse a resume that would silently train on other words, or the same words under other ids."""
    theirs, ours = ckpt['vocab'], vocab.words()
    if len(theirs) != len(ours):
        fail(PROG, f'--resume: {args.resume} was trained with a vocabulary of {len(theirs)} words, --vocab_path '
                   f'{args.vocab_path} has {len(ours)}: pass the vocab.pkl it was trained with')
    moved = [(w, theirs.index(w), i) for i, w in enumerate(ours) if theirs[i] != w and w in theirs]
    if theirs != ours:
        example = (f'{moved[0][0]!r} is {moved[0][1]} there, {moved[0][2]} here' if moved
                   else f'{ours[next(i for i in range(len(ours)) if theirs[i] != ours[i])]!r} is not in it')
        fail(PROG, f'--resume: --vocab_path {args.vocab_path} does not give the words the ids {args.resume} was '
                   f'trained with ({example}): pass the vocab.pkl it was trained with')


def check_resume_encoder(ckpt, args, encoder):
    """Refuse a resume on another frozen ResNet than the checkpoint's training had."""
    fingerprint = ckpt.get('encoder_fingerprint')
    if isinstance(fingerprint, str) and fingerprint != encoder.fingerprint():  # older ones hold a float
        fail(PROG, f'--resume: {args.resume} was trained on another frozen ResNet ({encoder_id(ckpt["encoder_weights"])}) '
                   f'than --encoder_weights {args.encoder_weights} gives: pass the --encoder_weights it was trained with')


def repair_best(ckpt, progress):
    """best.pt must be the model the checkpoint calls best. A run killed between writing
    latest.pt and copying it to best.pt leaves an older best.pt: when the checkpoint resumed
    from is that best model itself, copy it over."""
    best = ckpt['best']
    if not best or best['global_step'] != ckpt['global_step']:
        return
    try:
        current = load_checkpoint(progress.best_path).get('best')
    except (FileNotFoundError, ValueError):
        current = None
    if current != best:
        copy_file(progress.args.resume, progress.best_path)
        print(f'note: {progress.best_path} was not the best model {progress.args.resume} records (epoch '
              f'{best["epoch"]}); copied it there')


def seed_everything(seed, device):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest convolutions


# ---------------------------------------------------------------------------

def epoch_loader(train_set, sampler, epoch, skip, args, loader_kw):
    """The training batches of `epoch` from batch `skip` on. Its own generator, so making an
    iterator never draws from the global random stream."""
    return DataLoader(train_set, batch_sampler=EpochBatchSampler(sampler, args.batch_size, skip),
                      generator=torch.Generator().manual_seed(args.seed + epoch), **loader_kw)


def interrupted_again(progress, master):
    """A second signal: stop at once, without saving (the model may be half-way through a step),
    saying what is on disk."""
    if master:
        on_disk = f'{progress.latest} holds the last save' if os.path.exists(progress.latest) else 'nothing was saved'
        print(f'\ninterrupted again: stopped without saving; {on_disk}', flush=True)
    sys.exit(130)


def save_and_stop(progress, stop, master):
    """After a signal: save latest.pt (a second signal stops that too), say so, exit code 130."""
    if master:
        try:
            with stop.deferred():
                save(progress.latest, progress.checkpoint())
        except KeyboardInterrupt:
            interrupted_again(progress, master)
        print(f'\ninterrupted: saved {progress.latest} at epoch {progress.epoch}, step {progress.step}; '
              f'continue with --resume {progress.latest}', flush=True)
    sys.exit(130)


def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = setup_distributed(args)
    master = rank == 0  # only rank 0 prints and writes
    stop, lock = StopSignals(), None
    try:
        try:
            if master:
                print(vars(args))
                lock = claim_model_path(args.model_path)
            model, ddp, optimizer, scaler, progress, train_set, val_set = set_up(args, rank, world_size, device, master)
            sampler, val_loader, loader_kw = make_loaders(args, train_set, val_set, world_size, rank, device)
        except KeyboardInterrupt:
            print('\ninterrupted before training started: nothing saved', flush=True)
            sys.exit(130)

        plotted = 0.0
        try:
            for epoch in range(progress.epoch, args.num_epochs):
                progress.epoch = epoch
                sampler.set_epoch(epoch)
                set_epoch(train_set, epoch)
                loader = epoch_loader(train_set, sampler, epoch, progress.step, args, loader_kw)
                with stop.deferred():  # a signal stops at the next batch boundary
                    ended = train_one_epoch(ddp, loader, optimizer, scaler, progress, args, device, stop, master)
                if ended == 'stop':
                    break
                plotted = end_of_epoch(model, epoch_loader(train_set, sampler, epoch, 0, args, loader_kw), val_loader,
                                       val_set, progress, args, device, master, stop, plotted)
                if ended == 'limit' or stop.stop_now(device):
                    break
        except KeyboardInterrupt:
            if stop.signals > 1:
                interrupted_again(progress, master)
            # one signal, in validation or scoring: the model is as the last step left it
        if stop.requested:
            save_and_stop(progress, stop, master)
        if master:
            print(f'saved {progress.latest} and {progress.best_path}')
        return model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        release_model_path(lock)
        stop.restore()


def set_up(args, rank, world_size, device, master):
    """The model, its optimiser and the data sets, resumed from --resume when given:
    (model, ddp, optimizer, scaler, progress, train_set, val_set)."""
    seed_everything(args.seed, device)
    resumed = load_resume(args) if args.resume else None  # may set the model's sizes
    try:
        vocab = load_vocab(args.vocab_path)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, e)
    if resumed:
        check_resume_vocab(resumed, args, vocab)
    encoder, decoder, spec = build_model(args, vocab, device, master)
    if resumed:
        check_resume_encoder(resumed, args, encoder)
    try:
        train_set, val_set = make_datasets(args, vocab, encoder, spec, device, rank)
    except (OSError, ValueError) as e:  # missing pictures or captions, no room for the feature cache
        fail(PROG, e)
    model = TrainModel(encoder, decoder, args.attention_penalty).train()
    ddp = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None) if world_size > 1 else model
    optimizer, scaler = make_optimizer(args, encoder, decoder, device)
    progress = Progress(args, model, optimizer, scaler, vocab, spec)
    if resumed:
        progress.restore(resumed)
        if master:
            repair_best(resumed, progress)
            print(f'resumed from {args.resume}: epoch {progress.epoch}, step {progress.step}')
    return model, ddp, optimizer, scaler, progress, train_set, val_set


if __name__ == '__main__':
    main()
