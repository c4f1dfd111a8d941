"""COCO-format captions as batches: CocoDataset, collate_fn and get_loader.

A batch is what DecoderRNN wants, longest caption first:

    images  : (N, 3, crop, crop)      or features: (N, 2048) from the feature cache
    captions: LongTensor (N, L)       [<start>, w1, ..., wn, <end>, <pad>, ...]
    lengths : list of N ints          non-increasing, <start> and <end> included
"""
import os
import zlib

import torch
import torch.utils.data as data
import torchvision.transforms as T
from PIL import Image

from coco import existing_images, load_coco  # noqa: F401 -- also importable from here, as before
from images import open_rgb, to_rgb  # noqa: F401 -- likewise
from utils import leave_signals_to_parent
from vocab import tokenize

# ImageNet's statistics: the frozen ResNet was trained on images normalised this way
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AtLeast:
    """Scale a picture smaller than `size` (on either side) up until it fits a size x size crop,
    keeping its aspect ratio; larger pictures pass unchanged. RandomCrop would raise on them,
    and CenterCrop would pad them with black."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        width, height = image.size
        if width >= self.size and height >= self.size:
            return image
        scale = self.size / min(width, height)
        return image.resize((max(self.size, round(width * scale)), max(self.size, round(height * scale))),
                            Image.Resampling.LANCZOS)

    def __repr__(self):
        return f'AtLeast({self.size})'


def image_transform(crop_size, train):
    """Preprocessing of a resized image (resize.py made it image_size x image_size).

    train=True is the tutorial's augmentation (random crop and flip);
    train=False is the deterministic centre crop used for validation and sampling.
    A picture smaller than the crop (an odd one in a raw folder) is scaled up first.
    """
    crop = [T.RandomCrop(crop_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop_size)]
    return T.Compose([AtLeast(crop_size)] + crop + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image(path, image_size, crop_size):
    """Sample-time preprocessing, the same as validation's: resize.py's square resize,
    then the centre crop. Returns a (1, 3, crop_size, crop_size) tensor.

    A model whose image_size is below its crop_size gets its pictures scaled to the crop."""
    side = max(image_size, crop_size)
    image = open_rgb(path).resize((side, side), Image.Resampling.LANCZOS)
    return image_transform(crop_size, train=False)(image).unsqueeze(0)


def crop_size_of(transform):
    """The side of the crop a transform takes (RandomCrop or CenterCrop), or None."""
    for t in getattr(transform, 'transforms', [transform]):
        if isinstance(t, (T.RandomCrop, T.CenterCrop)):
            return max(t.size)
    return None


def encode_caption(caption, vocab):
    """'A dog runs.' -> LongTensor [<start>, a, dog, runs, ., <end>] of vocabulary ids."""
    ids = [vocab('<start>')] + [vocab(token) for token in tokenize(caption)] + [vocab('<end>')]
    return torch.tensor(ids, dtype=torch.long)


class CocoDataset(data.Dataset):
    """One item per caption: (image (3, crop, crop), caption LongTensor (L,)).

    Random augmentation is seeded by (seed, epoch, index), not by the worker's random
    state, so a resumed run sees exactly the crops the interrupted one would have,
    whatever the number of workers. Call ``set_epoch`` before each epoch.

    Captions of pictures missing from `root` are left out (see `existing_images`). When
    the transform crops, the first picture is checked to be at least as large as the crop.
    Raises FileNotFoundError or ValueError (one line each) for a bad caption file or folder.
    """

    def __init__(self, root, json, vocab, transform=None, seed=0):
        self.root = root
        self.coco = load_coco(json)
        present = set(existing_images(self.coco, root))
        self.ids = sorted(i for i, ann in self.coco.anns.items() if ann['image_id'] in present)
        crop = crop_size_of(transform)
        if crop is not None and present:
            first = os.path.join(root, self.coco.imgs[min(present)]['file_name'])
            with Image.open(first) as image:
                width, height = image.size
            if min(width, height) < crop:
                raise ValueError(
                    f'CocoDataset: the pictures in {root} are {width} x {height} (e.g. {first}), smaller than the '
                    f'{crop} x {crop} crop: pass --crop_size {min(width, height)} or less, or resize them with '
                    f'python resize.py --image_size {max(crop, 256)} --output_dir {root}')
        self.vocab = vocab
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def item_image_ids(self):
        """The COCO image id of every item, in item order."""
        return [self.coco.anns[i]['image_id'] for i in self.ids]

    def image_path(self, index):
        image_id = self.coco.anns[self.ids[index]]['image_id']
        return os.path.join(self.root, self.coco.loadImgs(image_id)[0]['file_name'])

    def caption(self, index):
        """Item index's caption alone, LongTensor (L,): no picture is opened."""
        return encode_caption(self.coco.anns[self.ids[index]]['caption'], self.vocab)

    def __getitem__(self, index):
        caption = self.caption(index)
        path = self.image_path(index)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"CocoDataset: image {path} not found; resize the images into {self.root} first: "
                f"python resize.py --image_dir <original images> --output_dir {self.root}")
        image = open_rgb(path)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f'{self.seed}/{self.epoch}/{index}'.encode()))
                image = self.transform(image)
        return image, caption

    def __len__(self):
        return len(self.ids)


def collate_fn(data):
    """Batch (image or feature, caption) pairs, longest caption first (pack_padded_sequence
    wants them sorted).

    Returns:
        images: (N, 3, H, W), or (N, D) when the items are features
        targets: LongTensor (N, L), padded with <pad> = 0
        lengths: list of N ints, non-increasing
    """
    data = sorted(data, key=lambda item: len(item[1]), reverse=True)
    images, captions = zip(*data)
    images = torch.stack(images, 0)
    lengths = [len(cap) for cap in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for i, cap in enumerate(captions):
        targets[i, :lengths[i]] = cap
    return images, targets, lengths


def worker_init_fn(worker_id):
    """The worker_init_fn of every DataLoader here: Ctrl-C and SIGTERM are the main process's
    to answer, and a worker ends with it (utils.leave_signals_to_parent)."""
    leave_signals_to_parent(os.getppid())


def get_loader(root, json, vocab, transform, batch_size, shuffle, num_workers, seed=0, **kwargs):
    """The tutorial's entry point: a DataLoader over CocoDataset with collate_fn.
    Extra keyword arguments (sampler, pin_memory, ...) go to the DataLoader."""
    coco = CocoDataset(root=root, json=json, vocab=vocab, transform=transform, seed=seed)
    return data.DataLoader(dataset=coco, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                           collate_fn=collate_fn, worker_init_fn=worker_init_fn, **kwargs)
