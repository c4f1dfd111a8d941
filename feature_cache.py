r"""Feature cache for the frozen encoder: run ResNet-152 once per image, then read its features.

The ResNet in EncoderCNN never learns, so its pooled 2048-d feature of a given crop is the
same every epoch and every run. This module computes it once per (image, view), stores it in
a memory-mapped .npy file next to the data, and serves (feature, caption) pairs from there:
a training step then costs a 2048 x E matrix product instead of a ResNet-152 forward pass.

    python train.py --augment none          # train.py builds and reads the cache by itself

File layout (cache_dir; train.py's default is features/ beside the image folder)::

    data/
      train2014/  val2014/              images, already resized by resize.py
      annotations/captions_train2014.json
      features/
        features-3f9c0d1e2a4b5c6d.npy           float32 (V, N, 2048), memory-mapped
                                                (V, N, R*2048) for AttentionDecoder's R regions
        features-3f9c0d1e2a4b5c6d.json          meta: key ingredients, shape, 'complete': true
        features-77ab12cd34ef5678.npy.partial   a build in progress (or a killed one: rebuilt)
        captions-0a1b2c3d4e5f6a7b.npz           the captions as vocabulary ids (FeatureDataset)

One .npy holds every view of every image of one caption file::

                 row 0      row 1     ...   row N-1       rows: the json's images, by image id
    view 0     [ centre crop                          ]   = image_transform(crop, train=False)
    view 1     [ random crop + flip, seeded (seed, 1, row) ]
    ...
    view V-1   [ random crop + flip, seeded (seed, V-1, row) ]

The file name is the first 16 hex digits of a sha256 over everything that determines the
numbers in it: every image's (id, file name, size, mtime), crop_size, views, seed (views > 1),
encoder_id, the ResNet's weights (EncoderCNN.fingerprint), the autocast dtype, the feature
size and FORMAT. Change any of them and the name changes, so a stale cache is never found,
let alone used. A cache is valid only if its meta json (written last, atomically) says
complete, carries the full key, and the .npy has exactly the expected shape, dtype and size.

Views and augmentation (the README has the whole trade-off):
    views=1   view 0 only: training without augmentation, exactly as with centre crops.
    views=K   K-1 fixed random crops/flips per image (K CNN passes per image to build);
              FeatureDataset(train=True) draws one of views 1..K-1 per (seed, epoch, caption).
"""
import contextlib
import hashlib
import inspect
import json as jsonlib
import os
import shutil
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.utils.data as data
import torchvision.transforms.functional as TF

import data_loader
from coco import existing_images, load_coco
from data_loader import IMAGENET_MEAN, IMAGENET_STD, encode_caption, image_transform, open_rgb, worker_init_fn
from progress import Progress, rank_zero
from utils import atomic_write, cpu_info, file_sha256, remove_stale_temporaries
from vocab import tokenize

try:  # advisory lock so two independent runs never fill the same .partial (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, one build at a time is up to the user
    fcntl = None

# Bump whenever a change here changes the numbers in a cache (view seeding, transforms, layout):
# old caches then get another key and are rebuilt instead of used.
FORMAT = 1


def _digest(*parts):
    """sha256 hex digest of a JSON-able description (stable across runs and machines)."""
    return hashlib.sha256(jsonlib.dumps(parts, sort_keys=True).encode()).hexdigest()


def _say(message):
    """One line on stdout from the process that does the work (rank 0 under torchrun)."""
    if rank_zero():
        print(f'feature cache: {message}', flush=True)


def native_bf16(device='cpu'):
    """True where `device` computes in bfloat16 natively, so that bf16 autocast speeds up the
    frozen ResNet: a CPU with Intel AMX or AVX512-BF16 (oneDNN then runs bf16 convolutions on
    them), or a CUDA GPU of compute capability 8.0 or more. Elsewhere bf16 is emulated, slower
    than float32, and the answer is False."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != 'cpu' or not torch.backends.mkldnn.is_available():
        return False
    return bool(cpu_flags() & {'amx_bf16', 'avx512_bf16'})


def cpu_flags():
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo ('avx512f', 'amx_bf16', ...);
    an empty set on other systems."""
    return set(cpu_info('flags').split())


@contextlib.contextmanager
def channels_last(module):
    """Run the block with `module`'s 4-D weights in channels-last layout, then give them back
    the layout they had (the caller's module is left as it was; its values never change)."""
    weights = [p for p in module.parameters() if p.dim() == 4]
    if all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
        yield
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _removed_on_sigterm(path):
    """While the block runs, a SIGTERM that would kill the process (no handler installed)
    removes `path` first and then kills it all the same. An installed handler, such as
    train.py's, which raises KeyboardInterrupt, is left alone: the caller cleans up then."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def remove_and_die(signum, frame):
        with contextlib.suppress(OSError):
            os.remove(path)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, remove_and_die)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def random_view(image, crop_size, generator):
    """The tutorial's RandomCrop(crop_size) + RandomHorizontalFlip, drawn from `generator`
    instead of the global random state, so that a rebuild gives identical bytes.

    Returns a (3, crop_size, crop_size) tensor, normalised like image_transform's.
    """
    width, height = image.size
    if width < crop_size or height < crop_size:
        raise ValueError(f"FeatureCache: Expected images of at least {crop_size} x {crop_size} "
                         f"(--crop_size), got {width} x {height}; resize them with resize.py first")
    top = int(torch.randint(0, height - crop_size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop_size + 1, (1,), generator=generator))
    image = TF.crop(image, top, left, crop_size, crop_size)
    if float(torch.rand(1, generator=generator)) < 0.5:
        image = TF.hflip(image)
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def view_seed(seed, view, row):
    """The 63-bit seed of random view `view` of image `row`: a hash, so nearby rows and views
    get unrelated crops."""
    digest = hashlib.sha256(f'{seed}/{view}/{row}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


class _ImageViews(data.Dataset):
    """Item i: (i, all V views of image i as one (V, 3, crop, crop) tensor).

    All views of an image come from a single decode of its file: decoding, not cropping,
    is what costs on the CPU side.
    """

    def __init__(self, paths, crop_size, views, seed):
        self.paths, self.crop_size, self.views, self.seed = paths, crop_size, views, seed
        self.centre = image_transform(crop_size, train=False)  # view 0: exactly validation's input

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        image = open_rgb(self.paths[row])  # the same decoding as CocoDataset's
        crops = [self.centre(image)]
        for view in range(1, self.views):
            generator = torch.Generator().manual_seed(view_seed(self.seed, view, row))
            crops.append(random_view(image, self.crop_size, generator))
        return row, torch.stack(crops)  # (V, 3, crop, crop)


class FeatureCache:
    r"""Pooled ResNet features of every image of a COCO caption file, computed once, kept on disk.

    Args:
        root: folder of the (resized) images; the json's file_name is relative to it
        json: COCO caption file; its annotated images, ordered by image id, are the rows
        crop_size: side of the crops fed to the ResNet (the tutorial's 224)
        views: V, crops cached per image: view 0 is the centre crop, views 1..V-1 random
            crops + flips. Default: 1
        encoder_id: names the ResNet's weights, e.g. 'imagenet:IMAGENET1K_V1', 'random:seed=0',
            'file:<sha1>' (checkpoint.encoder_id); the key also holds encoder.fingerprint(), which
            checks them. Default: 'unnamed'
        cache_dir: where the files go. Default: features/ beside `root`
        seed: seeds the random views (only part of the key when views > 1). Default: 0
        amp_dtype: autocast dtype of the build (torch.bfloat16, torch.float16) or None for
            float32. Lower precision changes the features, so it is part of the key. Default: None

    Attributes:
        features: after load/build, the read-only np.memmap of shape (V, N, D), float32
        image_ids: list of N COCO image ids, the rows in order: the captioned images whose
            picture is in `root` (coco.existing_images)
        row: dict COCO image id -> row
        coco: the pycocotools COCO of `json` (loaded on first use)

    where: V = views, N = number of images in the json, D = 2048, the ResNet's feature size

    Under torchrun: call load_or_build on rank 0 only, then torch.distributed.barrier(),
    then load_or_build (which now only loads) on every rank, as train.py does.

    Examples::

        >>> cache = FeatureCache('data/resized2014', 'data/annotations/captions_train2014.json', 224)
        >>> features = cache.load_or_build(encoder, 'cuda', batch_size=128, num_workers=4)
        >>> features.shape
        (1, 82783, 2048)
    """

    def __init__(self, root, json, crop_size, views=1, encoder_id='unnamed', cache_dir=None, seed=0,
                 amp_dtype=None):
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"FeatureCache: Expected views to be an int >= 1, got {views!r}")
        if not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"FeatureCache: Expected crop_size to be an int >= 1, got {crop_size!r}")
        self.root, self.json, self.crop_size, self.views = root, json, crop_size, views
        self.encoder_id, self.seed, self.amp_dtype = str(encoder_id), int(seed), amp_dtype
        self.cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.normpath(root)), 'features')
        self.features = None
        self.key, self.regions = None, 0
        self._coco = None

    # -- what the cache holds -------------------------------------------------------------

    @property
    def coco(self):
        if self._coco is None:
            # checked as CocoDataset checks it: a bad caption file is one ValueError or FileNotFoundError
            self._coco = load_coco(self.json)
            # the captioned images whose picture is there, by id: the rows of the cache (a few
            # missing pictures are left out with a note, as CocoDataset leaves out their captions)
            self._image_ids = existing_images(self._coco, self.root)
            self._row = {image_id: row for row, image_id in enumerate(self._image_ids)}
        return self._coco

    @property
    def image_ids(self):
        self.coco  # noqa: B018 -- loads the json on first use
        return self._image_ids

    @property
    def row(self):
        self.coco  # noqa: B018
        return self._row

    def paths(self):
        """The N image files, in row order."""
        coco = self.coco
        return [os.path.join(self.root, coco.imgs[i]['file_name']) for i in self.image_ids]

    def ingredients(self, encoder):
        """Everything the cached numbers depend on, as a dict (the key is its digest)."""
        grid = getattr(encoder, 'grid_size', 0)
        coco, stats, missing = self.coco, [], []
        for image_id, path in zip(self.image_ids, self.paths()):
            try:
                st = os.stat(path)
            except FileNotFoundError:  # deleted since existing_images looked
                missing.append(path)
                continue
            # size and mtime_ns: resize.py (re)writing an image changes them; hashing the
            # pixels of 83k files would take longer than the check is worth
            stats.append((image_id, coco.imgs[image_id]['file_name'], st.st_size, st.st_mtime_ns))
        if missing:
            raise FileNotFoundError(
                f"FeatureCache: {len(missing)} of {len(self.image_ids)} images of {self.json} are missing "
                f"(first: {missing[0]}); resize them into {self.root} first: "
                f"python resize.py --image_dir <original images> --output_dir {self.root}")
        return {
            'format': FORMAT,
            'images': _digest(stats),
            'num_images': len(stats),
            'crop_size': self.crop_size,
            'views': self.views,
            'seed': self.seed if self.views > 1 else None,  # view 0 does not depend on it
            'encoder_id': self.encoder_id,
            'weights': encoder.fingerprint(),
            'amp_dtype': None if self.amp_dtype is None else str(self.amp_dtype).replace('torch.', ''),
            'dim': encoder.linear.in_features * max(1, grid) ** 2,  # D, or R * D for a grid
            # the region grid (AttentionDecoder), absent for the pooled vector so that pooled
            # caches keep their names; a grid cache never answers to a pooled key, nor the reverse
            **({'grid_size': grid} if grid else {}),
        }

    def _name(self, key):
        base = os.path.join(self.cache_dir, f'features-{key[:16]}')
        return base + '.npy', base + '.json'

    def _shape(self, ingredients):
        return self.views, ingredients['num_images'], ingredients['dim']  # (V, N, D)

    def _set_key(self, encoder):
        ingredients = self.ingredients(encoder)
        self.regions = getattr(encoder, 'grid_size', 0) ** 2  # 0: pooled features
        self.key = _digest(ingredients)
        self.path, self.meta_path = self._name(self.key)
        return ingredients

    def _check(self, ingredients):
        """(memmap, None) if the cache of self.key is complete and intact, else (None, why)."""
        try:
            with open(self.meta_path) as f:
                meta = jsonlib.load(f)
        except FileNotFoundError:
            return None, 'missing'
        except (OSError, ValueError) as e:
            return None, f'{self.meta_path} is unreadable ({e})'
        if meta.get('key') != self.key:  # a 64-bit file name clash, or a hand-edited file
            return None, f'{self.meta_path} belongs to another key'
        if meta.get('complete') is not True:
            return None, f'{self.meta_path} is not marked complete'
        shape = self._shape(ingredients)
        try:
            features = np.load(self.path, mmap_mode='r')
        except (OSError, ValueError) as e:  # missing, truncated below its header's shape, garbage
            return None, f'{self.path} is missing or truncated ({e})'
        if features.shape != shape or features.dtype != np.float32 or not features.flags.c_contiguous:
            return None, f'{self.path} holds {features.dtype} {features.shape}, expected float32 {shape}'
        if features.offset + features.nbytes != os.path.getsize(self.path):
            return None, f'{self.path} has {os.path.getsize(self.path)} bytes, expected {features.offset + features.nbytes}'
        return features, None

    def _why_new(self, ingredients):
        """Which ingredients differ from the newest complete cache of the same caption file."""
        others = []
        for name in os.listdir(self.cache_dir) if os.path.isdir(self.cache_dir) else []:
            if name.startswith('features-') and name.endswith('.json'):
                try:
                    with open(os.path.join(self.cache_dir, name)) as f:
                        meta = jsonlib.load(f)
                except (OSError, ValueError):
                    continue
                if meta.get('complete') and meta.get('json') == os.path.abspath(self.json):
                    mtime = os.path.getmtime(os.path.join(self.cache_dir, name))
                    others.append((mtime, name, meta.get('ingredients', {})))
        if not others:
            return 'no cache for this image set/crop/weights'
        _, name, old = max(others)
        changed = [k for k in ingredients if old.get(k) != ingredients[k]]
        return f"no cache for this image set/crop/weights (changed since {name}: {', '.join(changed) or 'key'})"

    # -- load and build -------------------------------------------------------------------

    def load(self, encoder):
        """The cached features if a complete, intact cache exists (never builds), else None.

        Returns: np.memmap of shape (V, N, D), float32, read-only; also kept as self.features.
        """
        features, _ = self._check(self._set_key(encoder))
        self.features = features
        return features

    def load_or_build(self, encoder, device='cpu', batch_size=64, num_workers=0, amp_dtype=None):
        """The cached features, built first if there is no valid cache.

        Args:
            encoder: EncoderCNN, already on `device`; only its frozen ResNet runs
            device: where the images go. Default: 'cpu'
            batch_size: crops per ResNet forward pass. Default: 64
            num_workers: DataLoader processes decoding images. Default: 0
            amp_dtype: overrides the constructor's autocast dtype (it is part of the key)

        Returns: np.memmap of shape (V, N, D), float32, read-only
        """
        if amp_dtype is not None:
            self.amp_dtype = amp_dtype
        ingredients = self._set_key(encoder)
        features, why = self._check(ingredients)
        if features is None:
            with self._lock():
                # another run may have built it while we waited for the lock
                features, why = self._check(ingredients)
                if features is None:
                    reason = self._why_new(ingredients) if why == 'missing' else why
                    return self._build(encoder, ingredients, reason, device, batch_size, num_workers)
        if self.features is None:  # once per run, not again after torchrun's barrier
            size = os.path.getsize(self.path)
            _say(f'{os.path.basename(self.path)}: {features.shape[1]} images x {features.shape[0]} views '
                 f'({size / 1e6:.1f} MB) read from disk, the ResNet will not run')
        self.features = features
        return features

    def build(self, encoder, device='cpu', batch_size=64, num_workers=0):
        """Compute the features again, whatever is on disk (see load_or_build for the args)."""
        ingredients = self._set_key(encoder)
        with self._lock():
            return self._build(encoder, ingredients, 'rebuild asked for', device, batch_size, num_workers)

    @contextlib.contextmanager
    def _lock(self):
        """Hold an exclusive lock on cache_dir, so that two runs never build into the same files."""
        os.makedirs(self.cache_dir, exist_ok=True)
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(self.cache_dir, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    _say(f'another process is building in {self.cache_dir}; waiting for it')
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # e.g. a file system without flock: go on unlocked
                warnings.warn(f'FeatureCache: cannot lock {self.cache_dir} ({e}); do not build the same '
                              f'cache from two runs at once')
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing releases the flock

    def _build(self, encoder, ingredients, reason, device, batch_size, num_workers):
        device = torch.device(device)
        shape = self._shape(ingredients)  # (V, N, D)
        partial = self.path + '.partial'
        nbytes = int(np.prod(shape)) * 4
        # the meta goes first: from here until the new meta lands, this key has no valid cache
        for stale in (self.meta_path, partial):
            if os.path.exists(stale):
                if stale == partial:
                    _say(f'removing {os.path.basename(partial)}, left by an interrupted build')
                os.remove(stale)
        remove_stale_temporaries(self.cache_dir)  # a killed run's half-written meta or captions
        free = shutil.disk_usage(self.cache_dir).free
        if free < nbytes:
            raise OSError(f"FeatureCache: the cache needs {nbytes / 1e9:.2f} GB but {self.cache_dir} has "
                          f"{free / 1e9:.2f} GB free; point --feature_cache_dir elsewhere or use --feature_cache off")
        _say(f'{reason}: building {os.path.basename(self.path)} '
             f'({shape[1]} images x {shape[0]} views, crop {self.crop_size}, {self.encoder_id})')

        tic = time.time()
        images = _ImageViews(self.paths(), self.crop_size, self.views, self.seed)
        # batch_size counts crops, as one ResNet batch; each item brings all V views of an image
        loader = data.DataLoader(images, batch_size=max(1, batch_size // self.views), shuffle=False,
                                 num_workers=num_workers, pin_memory=device.type == 'cuda',
                                 worker_init_fn=worker_init_fn)
        # An error, Ctrl-C or SIGTERM leaves nothing behind; only a SIGKILL leaves the .partial,
        # which the next build deletes.
        try:
            with _removed_on_sigterm(partial):
                out = np.lib.format.open_memmap(partial, mode='w+', dtype=np.float32, shape=shape)
                self._fill(out, encoder, device, loader)
                out.flush()
                del out
                # on disk for real before the rename, and the rename before the meta that vouches for it
                with open(partial, 'rb+') as f:
                    os.fsync(f.fileno())
                os.replace(partial, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise
        seconds = time.time() - tic
        meta = {'key': self.key, 'complete': True, 'shape': list(shape), 'dtype': 'float32',
                'ingredients': ingredients, 'root': os.path.abspath(self.root), 'json': os.path.abspath(self.json),
                'created': time.strftime('%Y-%m-%dT%H:%M:%S'), 'build_seconds': round(seconds, 3),
                'device': str(device), 'torch': torch.__version__}
        with atomic_write(self.meta_path, 'w') as f:  # a reader sees the old meta or the whole new one
            jsonlib.dump(meta, f, indent=1)

        features, why = self._check(ingredients)
        assert features is not None, f'the cache just built does not check: {why}'
        _say(f'built {os.path.basename(self.path)}: {shape[1]} images x {shape[0]} views in {seconds:.1f} s '
             f'({shape[0] * shape[1] / max(seconds, 1e-9):.1f} crops/s), {nbytes / 1e6:.1f} MB on disk')
        self.features = features
        return features

    def _fill(self, out, encoder, device, loader):
        """Run the ResNet over every batch of views, writing into out: (V, N, D)."""
        bar = Progress(total=out.shape[1], desc='feature cache', unit='images')
        # Channels-last (NHWC) is the layout cuDNN's and oneDNN's fast convolutions work in, above
        # all their bf16 ones. On the CPU in float32 the ResNet keeps train.py's NCHW, so that the
        # cached features are the ones the pictures give there, to the last rounding.
        nhwc = device.type == 'cuda' or self.amp_dtype is not None
        layout = channels_last(encoder.resnet) if nhwc else contextlib.nullcontext()
        with layout, torch.inference_mode(), bar:  # the layout changes outside inference mode
            for rows, crops in loader:                                 # crops: (B, V, 3, crop, crop)
                start, stop = int(rows[0]), int(rows[-1]) + 1
                assert stop - start == len(rows), 'the image loader must keep row order'
                x = crops.to(device, non_blocking=True).flatten(0, 1)  # (B*V, 3, crop, crop)
                if nhwc:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    feats = encoder.extract(x)                         # (B*V, D)
                feats = feats.float().cpu().numpy().reshape(len(rows), self.views, -1)  # (B, V, D)
                out[:, start:stop] = feats.transpose(1, 0, 2)          # (V, B, D)
                bar.update(len(rows))

    def __getstate__(self):
        # DataLoader workers under spawn/forkserver pickle the dataset: a memmap would be
        # pickled as a full in-memory copy, and COCO's index is large. Both are reloaded.
        state = self.__dict__.copy()
        state['features'], state['_coco'] = None, None
        return state


class FeatureDataset(data.Dataset):
    r"""CocoDataset's items with the image replaced by its cached ResNet feature.

    One item per caption annotation of a picture in the cache, in CocoDataset's order (sorted
    annotation ids), so the two are interchangeable index for index.

    Args:
        cache: a FeatureCache after load_or_build (or load)
        vocab: vocab.Vocabulary
        seed: with `epoch` and the index, picks the view of a training item. Default: 0
        train: True draws one of the random views 1..V-1 per (seed, epoch, index) when V > 1;
            False (validation) always reads view 0, the centre crop. Default: True

    Outputs: feature, caption
        * feature: FloatTensor of shape (D,), or (R, D) from a grid cache (EncoderCNN.grid_size > 0)
        * caption: LongTensor of shape (L,), [<start>, w1, ..., wn, <end>]

    where: D = 2048, R = grid_size ** 2 regions, L = caption length including <start> and <end>

    The captions are encoded once (data_loader.encode_caption) and kept in one flat array;
    the ids are also saved next to the features, since tokenizing COCO's 414k captions takes
    over a minute and would otherwise be paid at every start.
    """

    def __init__(self, cache, vocab, seed=0, train=True):
        if cache.features is None:
            raise RuntimeError("FeatureDataset: the cache is not loaded; call cache.load_or_build(encoder, device) first")
        self.cache, self.seed, self.train, self.epoch = cache, int(seed), train, 0
        self.path, self.shape = cache.path, cache.features.shape  # (V, N, D), or (V, N, R*D) for a grid
        self.regions = cache.regions
        self._features = cache.features
        coco = cache.coco
        # annotation ids, item order; captions of missing pictures are left out, as CocoDataset's
        self.ids = np.array(sorted(i for i, ann in coco.anns.items() if ann['image_id'] in cache.row),
                            dtype=np.int64)
        self.image_ids = np.array([coco.anns[i]['image_id'] for i in self.ids.tolist()], dtype=np.int64)
        self.rows = np.array([cache.row[i] for i in self.image_ids.tolist()], dtype=np.int64)
        self.tokens, self.offsets = self._encode(cache, vocab)

    def _encode(self, cache, vocab):
        """All captions as ids: tokens[offsets[i]:offsets[i+1]] is item i's caption."""
        words = getattr(vocab, 'word2idx', None) or {w: i for i, w in enumerate(vocab.words())}
        key = _digest(FORMAT, file_sha256(cache.json), sorted(words.items()), vocab('<unk>'),
                      inspect.getsource(data_loader.encode_caption), inspect.getsource(tokenize),
                      getattr(sys.modules.get('nltk'), '__version__', None))
        path = os.path.join(cache.cache_dir, f'captions-{key[:16]}.npz')
        try:
            with np.load(path) as saved:
                if str(saved['key']) == key and np.array_equal(saved['ids'], self.ids):
                    return saved['tokens'], saved['offsets']
        except (OSError, ValueError, KeyError):
            pass  # not there yet, or unreadable: encode again
        coco, lengths, chunks = cache.coco, [], []
        for ann_id in Progress(self.ids.tolist(), desc='encoding captions', unit='captions'):
            ids = encode_caption(coco.anns[ann_id]['caption'], vocab)  # exactly CocoDataset's
            chunks.append(ids.numpy())
            lengths.append(len(ids))
        dtype = np.int32 if len(vocab) < 2 ** 31 else np.int64
        tokens = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        try:
            with atomic_write(path) as f:  # np.savez given a file object adds no '.npz' to the name
                np.savez(f, key=np.array(key), ids=self.ids, tokens=tokens, offsets=offsets)
        except OSError as e:  # a read-only cache_dir costs speed, not correctness
            warnings.warn(f'FeatureDataset: cannot save encoded captions to {path} ({e})')
        return tokens, offsets

    def set_epoch(self, epoch):
        """Training items of another epoch read other views (when V > 2)."""
        self.epoch = epoch

    def view(self, index):
        """Which of the V views item `index` reads this epoch: 0, or one of 1..V-1 in training."""
        views = self.shape[0]
        if not self.train or views == 1:
            return 0
        digest = hashlib.blake2b(f'{self.seed}/{self.epoch}/{index}'.encode(), digest_size=8).digest()
        return 1 + int.from_bytes(digest, 'little') % (views - 1)

    def item_image_ids(self):
        """The COCO image id of every item, in item order (as CocoDataset.item_image_ids)."""
        return self.image_ids.tolist()

    def __getitem__(self, index):
        if self._features is None:  # in a worker that got this dataset pickled
            self._features = np.load(self.path, mmap_mode='r')
            assert self._features.shape == self.shape, f'{self.path} changed under a running job'
        # np.array copies the 8 KB row out of the read-only map: torch wants writable memory
        feature = torch.from_numpy(np.array(self._features[self.view(index), self.rows[index]]))  # (D,) or (R*D,)
        if self.regions:
            feature = feature.view(self.regions, -1)                                              # (R, D)
        return feature, self.caption(index)

    def caption(self, index):
        """Item index's caption alone, LongTensor (L,) (as CocoDataset.caption)."""
        return torch.from_numpy(self.tokens[self.offsets[index]:self.offsets[index + 1]].astype(np.int64))

    def __len__(self):
        return len(self.ids)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_features'] = None  # reopened lazily: a pickled memmap would be a full copy
        return state

