"""Make the built-in caption data set: coloured shapes on coloured backgrounds, in COCO's format.

Each picture shows 1 to 3 objects of one shape (circle, square, triangle), one colour
and one size (small, large), grouped on one side of the picture (left, right, top,
bottom or the middle), on a background of another colour with faint noise. Each
picture gets 5 differently worded captions made from its scene (40 words in all), e.g.

    two large red circles on the left of a blue image
    a blue picture with two big red circles on the left
    there are two large red circles on the left

The scenes are built so that a captioner can learn them even through a frozen ResNet-152
with *random* weights (the pipeline's, see checkpoint.scale_residual_branches): its pooled
features keep the background and object colours, roughly where the objects are and how
big; the count only weakly, and the shape (fine detail) not at all: that takes ImageNet
weights. --probe measures this with a linear probe per attribute (docs/shapes.md has its
results).

The defaults suit a CPU demo: 96 x 96 pictures, fed to the ResNet as 84 x 84 centre
crops (train.py --image_size 96 --crop_size 84).

Everything comes from --seed: the same command writes byte-identical files, and picture
i of a split does not depend on how many pictures are asked for.

    <output_dir>/images/train/shapes_train_000001.png ...
    <output_dir>/images/val/shapes_val_000001.png ...
    <output_dir>/annotations/captions_train.json      COCO captions layout, like captions_train2014.json
    <output_dir>/annotations/captions_val.json        like captions_val2014.json

Each image record also carries its 'scene' (the attributes the captions describe).

Example:
    python make_shapes.py --output_dir data/shapes --num_train 1500 --num_val 150 --image_size 96 --seed 0
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import json
import os
import random
import re
import time

import numpy as np
from PIL import Image, ImageDraw

from utils import HelpFormatter, atomic_write, remove_stale_temporaries

# the palette: names are caption words; RGB values are far apart, so that even a blurry
# colour summary (what random features keep) separates them
COLOURS = {
    'red': (210, 40, 40),
    'green': (40, 160, 60),
    'blue': (40, 80, 210),
    'yellow': (235, 205, 40),
    'white': (240, 240, 240),
    'black': (25, 25, 25),
}
SHAPES = ('circle', 'square', 'triangle')
COUNTS = (1, 2, 3)
SIZES = ('small', 'large')
POSITIONS = ('left', 'right', 'top', 'bottom', 'middle')
# the attributes a scene has (and that --probe tries to read back from the features)
ATTRIBUTES = ('background', 'colour', 'shape', 'count', 'size', 'position')

# object radius r as a fraction of the picture side (squares have the circle's area,
# triangles reach 1.25 r); large is about twice small, so size survives any resize
RADIUS = {'small': (0.06, 0.075), 'large': (0.11, 0.13)}
# squares and triangles reach 1.25 r from their centre: used for spacing and margins
EXTENT = 1.25
# objects stay this far (fraction of the side) inside the border, so the centre crop
# (84 of 96 cuts 6.25% per side) keeps them whole; a random 84-crop may shave up to 4.5%
# of the side off an object at the border (more margin leaves no room for 3 large ones)
MARGIN = 0.08
# the group's centre must be this far from the picture's centre along its side (and
# closer than this to it for 'middle'), so that every position word is unambiguous
OFF_CENTRE = 0.12
MIDDLE = 0.07
# backgrounds vary by colour jitter and by pixel noise of std 0..NOISE, the same all over the
# picture. No brightness gradient: to random encoder features a bright side looks like
# "something on the left", and --probe then reads the position far worse (docs/shapes.md)
NOISE = 6
SUPERSAMPLE = 4  # shapes are drawn 4x larger, then shrunk: smooth (antialiased) edges

# caption words: a few synonyms, so captions vary, but a small vocabulary (40 words)
COUNT_WORDS = {1: ('a', 'one'), 2: ('two',), 3: ('three',)}
SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
POSITION_WORDS = {'left': ('on the left',), 'right': ('on the right',), 'top': ('at the top',),
                  'bottom': ('at the bottom',), 'middle': ('in the middle', 'in the center')}
PLURAL = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles'}


# ---------------------------------------------------------------------------------------
# scenes and captions


def sample_scene(rng):
    """A random scene description: a dict with one value per name in ATTRIBUTES."""
    background = rng.choice(sorted(COLOURS))
    colour = rng.choice([c for c in sorted(COLOURS) if c != background])  # never invisible
    return {'background': background, 'colour': colour, 'shape': rng.choice(SHAPES),
            'count': rng.choice(COUNTS), 'size': rng.choice(SIZES), 'position': rng.choice(POSITIONS)}


def in_position(cx, cy, position):
    """True if a group centred at (cx, cy) (fractions of the side) is clearly at `position`."""
    dx, dy = cx - 0.5, cy - 0.5
    if position == 'middle':
        return max(abs(dx), abs(dy)) < MIDDLE
    # how far the group is towards that side, and how far sideways: the side must win
    along, across = {'left': (-dx, dy), 'right': (dx, dy), 'top': (-dy, dx), 'bottom': (dy, dx)}[position]
    return along > OFF_CENTRE and along > abs(across)


def place_objects(scene, rng, tries=20000):
    """Centres and radii (fractions of the side) of the scene's objects: inside the
    margin, not touching each other, and with their mean at the scene's position.

    Returns a list of (cx, cy, r), one per object. Rejection sampling: cheap, and exact.
    """
    lo_r, hi_r = RADIUS[scene['size']]
    for _ in range(tries):
        objects = []
        for _ in range(scene['count']):
            r = rng.uniform(lo_r, hi_r)
            lo, hi = MARGIN + EXTENT * r, 1 - MARGIN - EXTENT * r
            objects.append((rng.uniform(lo, hi), rng.uniform(lo, hi), r))
        apart = all((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 > (EXTENT * (a[2] + b[2]) + 0.02) ** 2
                    for i, a in enumerate(objects) for b in objects[i + 1:])
        cx = sum(o[0] for o in objects) / len(objects)
        cy = sum(o[1] for o in objects) / len(objects)
        if apart and in_position(cx, cy, scene['position']):
            return objects
    # the constants above leave room for 3 large objects in every position; this is a bug
    raise AssertionError(f'make_shapes: could not place {scene} in {tries} tries')


def captions_for(scene, rng, n):
    """n differently worded captions (distinct templates) of a scene, lower case, <= 12 words.

    Every caption names the count, colour and shape; most also name the size, the
    position and the background, so each attribute appears in several captions.
    """
    count = scene['count']
    number = rng.choice(COUNT_WORDS[count])
    shape = scene['shape'] if count == 1 else PLURAL[scene['shape']]
    size = rng.choice(SIZE_WORDS[scene['size']])
    colour, bg = scene['colour'], scene['background']
    obj = f'{number} {size} {colour} {shape}'  # 'two large red circles'
    pos = rng.choice(POSITION_WORDS[scene['position']])  # 'on the left'
    templates = [
        f'{number} {colour} {shape} on a {bg} background',
        f'a {bg} picture with {obj} {pos}',
        f'there {"is" if count == 1 else "are"} {obj} {pos}',
        f'{obj} {pos} of a {bg} image',
        f'an image of {obj} on {bg}',
        f'{obj} {pos} against a {bg} background',
    ]
    if not 1 <= n <= len(templates):
        raise ValueError(f'captions_for: Expected 1 to {len(templates)} captions, got {n}')
    return rng.sample(templates, n)


# ---------------------------------------------------------------------------------------
# drawing


def draw_scene(scene, objects, size, rng):
    """Render a scene as a size x size RGB PIL image.

    The background is the colour, jittered, with faint pixel noise (so backgrounds vary,
    but their colour name stays right); the objects share one jittered colour and are
    drawn at SUPERSAMPLE x size, then shrunk.
    """
    nrng = np.random.default_rng(rng.getrandbits(63))  # numpy draws, seeded from the scene's rng

    def jitter(rgb, amount):
        return np.clip(np.array(rgb, dtype=np.float64) + [rng.uniform(-amount, amount) for _ in rgb], 0, 255)

    # background (size, size, 3): jittered colour + noise
    picture = jitter(COLOURS[scene['background']], 15) + nrng.normal(0, rng.uniform(0, NOISE), (size, size, 3))

    # object mask (size, size) in [0, 1]: drawn big, shrunk with a box filter (= area coverage)
    big = size * SUPERSAMPLE
    mask = Image.new('L', (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, r in objects:
        x, y, r = cx * big, cy * big, r * big
        if scene['shape'] == 'circle':
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        elif scene['shape'] == 'square':  # same area as the circle: half side r * sqrt(pi) / 2
            h = 0.886 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=255)
        else:  # upright equilateral triangle, centroid at (x, y), circumradius EXTENT * r
            R = EXTENT * r
            draw.polygon([(x, y - R), (x - 0.866 * R, y + R / 2), (x + 0.866 * R, y + R / 2)], fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
    picture = (1 - alpha) * picture + alpha * jitter(COLOURS[scene['colour']], 15)
    return Image.fromarray(np.clip(np.rint(picture), 0, 255).astype(np.uint8), 'RGB')


# ---------------------------------------------------------------------------------------
# writing the split


def atomic_write_json(obj, path):
    """Write obj to path as compact JSON; a crash leaves the old file or none, never half of one."""
    with atomic_write(path, 'w') as f:
        json.dump(obj, f, indent=None, separators=(',', ':'), sort_keys=False)
        f.write('\n')


def save_png(image, path):
    """Pillow writes no timestamp into a PNG; fixed settings make the bytes repeatable.

    No fsync: every run writes every picture again, and the caption file, written last
    and synced, is what a crash must not leave half-written."""
    with atomic_write(path, fsync=False) as f:
        image.save(f, format='PNG', compress_level=6, optimize=False)


# image ids: train 1..., val 1000001...; annotation ids likewise per split, so the two
# files never share an id, however many pictures each has
ID_OFFSET = {'train': 0, 'val': 1_000_000}


def make_split(split, num_images, args):
    """Draw, save and caption one split. Returns the COCO dict (also written to disk)."""
    image_dir = os.path.join(args.output_dir, 'images', split)
    os.makedirs(image_dir, exist_ok=True)
    remove_stale_temporaries(image_dir)  # pictures a killed run was writing
    images, annotations = [], []
    for i in range(1, num_images + 1):
        # one rng per picture, seeded by (seed, split, index): picture i is the same
        # whatever --num_train is (str seeds are hashed with sha512: stable everywhere)
        rng = random.Random(f'make_shapes/{args.seed}/{split}/{i}')
        scene = sample_scene(rng)
        objects = place_objects(scene, rng)
        picture = draw_scene(scene, objects, args.image_size, rng)
        name = f'shapes_{split}_{i:06d}.png'
        save_png(picture, os.path.join(image_dir, name))
        image_id = ID_OFFSET[split] + i
        images.append({'license': 1, 'id': image_id, 'file_name': name,
                       'width': args.image_size, 'height': args.image_size, 'scene': scene})
        for k, caption in enumerate(captions_for(scene, rng, args.captions_per_image)):
            annotations.append({'id': ID_OFFSET[split] * 10 + i * 10 + k, 'image_id': image_id,
                                'caption': caption})
    numbers = [re.fullmatch(rf'shapes_{split}_(\d+)\.png', n) for n in os.listdir(image_dir)]
    stale = [m for m in numbers if m and int(m.group(1)) > num_images]
    if stale:
        print(f'note: {image_dir} also holds {len(stale)} pictures from a larger earlier run '
              f'(no caption refers to them; delete the folder to drop them)')
    coco = {
        'info': {'description': f'make_shapes.py built-in caption set, {split} split',
                 'version': '1.0', 'contributor': 'make_shapes.py',
                 'make_shapes_args': {k: getattr(args, k) for k in ('seed', 'image_size', 'captions_per_image')}},
        'licenses': [{'id': 1, 'name': 'CC0 1.0 (generated pictures)',
                      'url': 'https://creativecommons.org/publicdomain/zero/1.0/'}],
        'images': images,
        'annotations': annotations,
    }
    path = os.path.join(args.output_dir, 'annotations', f'captions_{split}.json')
    atomic_write_json(coco, path)
    print(f'wrote {num_images} pictures to {image_dir}/ and {len(annotations)} captions to {path}')
    return coco


# ---------------------------------------------------------------------------------------
# --probe: what a randomly initialised ResNet-152 keeps of each attribute


def extract_features(paths, image_size, crop_size, seed, device='cpu', batch_size=32):
    """(N, 2048) float32 pooled features of the pipeline's random-weight ResNet-152
    (checkpoint.build_encoder with --encoder_weights none and this seed: what train.py uses),
    with the pipeline's preprocessing (data_loader.load_image: resize to image_size, centre
    crop crop_size, ImageNet normalisation). Returns (features, seconds per image)."""
    import torch
    from checkpoint import build_encoder, encoder_spec
    from data_loader import load_image

    encoder = build_encoder(8, encoder_spec('none', seed)).eval().to(device)
    features, start = [], time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(paths), batch_size):
            batch = torch.cat([load_image(p, image_size, crop_size) for p in paths[b:b + batch_size]])
            features.append(encoder.extract(batch.to(device)).float().cpu())  # (N_b, 2048)
            print(f'\rfeatures {min(b + batch_size, len(paths))}/{len(paths)}', end='', flush=True)
    print()
    return torch.cat(features), (time.perf_counter() - start) / len(paths)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, weight_decay=1e-3, steps=200):
    """Multinomial logistic regression (L-BFGS, L2 penalty) on standardised features.
    Returns (train accuracy, val accuracy)."""
    import torch
    import torch.nn.functional as F

    train_x, val_x = train_x.double(), val_x.double()  # float64: the features are ill-conditioned
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6 * train_x.std(0).max()
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std  # (N, 2048)
    w = torch.zeros(train_x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = [((x @ w + b).argmax(1) == y).float().mean().item()
                    for x, y in ((train_x, train_y), (val_x, val_y))]
    return tuple(accuracy)


def probe(args, splits):
    """Print per-attribute linear-probe accuracy of random ResNet-152 features.

    Two probes: on the raw features (what the encoder's Linear + BatchNorm1d sees) and on
    the features scaled to unit length. A ResNet with fresh BatchNorm statistics (mean 0,
    var 1) in eval mode and no biases is positively homogeneous, f(c x) = c f(x), so the
    length of a raw feature mostly repeats how bright the picture is, and a linear layer
    cannot divide it out; the second probe shows what is there once it is.
    """
    import torch

    print(f"probe: the pipeline's random-weight ResNet-152 (--encoder_weights none, seed {args.seed}), eval mode, "
          f'image_size {args.image_size}, centre crop {args.crop_size}, {torch.get_num_threads()} threads')
    features, labels = {}, {}
    for split, coco in splits.items():
        root = os.path.join(args.output_dir, 'images', split)
        paths = [os.path.join(root, im['file_name']) for im in coco['images']]
        features[split], per_image = extract_features(paths, args.image_size, args.crop_size, args.seed, args.device)
        labels[split] = [im['scene'] for im in coco['images']]
        print(f'{split}: {len(paths)} pictures, {1000 * per_image:.0f} ms per picture (loading included)')
    f = features['train']
    norm = f.norm(dim=1)  # (N,)
    unit = f / norm[:, None]
    u = unit.double()
    # how alike all pictures look to the network: 1 - cosine, averaged over pairs
    spread = 1 - (u.sum(0).square().sum() - len(u)) / (len(u) * (len(u) - 1))
    print(f'features (train): {f.dtype}, all finite: {bool(torch.isfinite(f).all())}, mean |x| {f.abs().mean():.3g}, '
          f'max {f.max():.3g}, length {norm.min():.3g} .. {norm.max():.3g}, mean 1 - cosine between pictures '
          f'{spread:.2g}, dims always 0: {int((f.abs().max(0).values == 0).sum())}/{f.shape[1]}')
    print(f'{"attribute":<11} {"classes":>7} {"chance":>7} {"raw train":>10} {"raw val":>8} '
          f'{"unit train":>11} {"unit val":>9}')
    for attribute in ATTRIBUTES:
        values = sorted({s[attribute] for split in labels for s in labels[split]}, key=str)
        y = {split: torch.tensor([values.index(s[attribute]) for s in labels[split]]) for split in labels}
        chance = torch.bincount(y['val'], minlength=len(values)).max().item() / len(y['val'])
        raw = linear_probe(features['train'], y['train'], features['val'], y['val'], len(values))
        scaled = linear_probe(unit, y['train'], features['val'] / features['val'].norm(dim=1, keepdim=True),
                              y['val'], len(values))
        print(f'{attribute:<11} {len(values):>7} {chance:>7.2f} {raw[0]:>10.2f} {raw[1]:>8.2f} '
              f'{scaled[0]:>11.2f} {scaled[1]:>9.2f}')
    print('(chance: share of the most frequent class in val; val: held-out pictures; raw: features as the '
          'encoder gives them; unit: scaled to length 1)')


def main(argv=None):
    parser = argparse.ArgumentParser(prog='make_shapes.py', description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    # data set
    parser.add_argument('--output_dir', type=str, default='data/shapes',
                        help='where images/{train,val}/ and annotations/captions_{train,val}.json go')
    parser.add_argument('--num_train', type=int, default=1500, help='pictures in the train split')
    parser.add_argument('--num_val', type=int, default=150, help='pictures in the val split')
    parser.add_argument('--image_size', type=int, default=96, help='side of the square pictures, in pixels')
    parser.add_argument('--captions_per_image', type=int, default=5,
                        help='differently worded captions per picture (1-6)')
    parser.add_argument('--seed', type=int, default=0, help='everything drawn follows from it')
    # probe
    parser.add_argument('--probe', action='store_true',
                        help='then measure what a random-weight ResNet-152 keeps of each attribute (needs torch)')
    parser.add_argument('--crop_size', type=int, default=84,
                        help='centre crop fed to the ResNet by --probe (train.py --crop_size)')
    parser.add_argument('--device', type=str, default='cpu', help='device for --probe: cpu, cuda, cuda:1, mps')
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error(f'--num_train and --num_val must be at least 1, got {args.num_train} and {args.num_val}')
    if args.image_size < 32:
        parser.error(f'--image_size must be at least 32 pixels (shapes get unreadable), got {args.image_size}')
    if not 1 <= args.captions_per_image <= 6:
        parser.error(f'--captions_per_image must be 1 to 6 (there are 6 templates), got {args.captions_per_image}')
    if args.probe and not 32 <= args.crop_size <= args.image_size:
        parser.error(f'--crop_size must be 32 to --image_size ({args.image_size}), got {args.crop_size}')
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f'--output_dir {args.output_dir} is a file: give a folder name, e.g. data/shapes')
    print(vars(args))

    os.makedirs(os.path.join(args.output_dir, 'annotations'), exist_ok=True)
    start = time.perf_counter()
    splits = {split: make_split(split, n, args) for split, n in (('train', args.num_train), ('val', args.num_val))}
    print(f'done in {time.perf_counter() - start:.1f} s')
    if args.probe:
        probe(args, splits)


if __name__ == '__main__':
    main()
