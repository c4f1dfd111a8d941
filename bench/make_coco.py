"""Make a synthetic data set at MS-COCO 2014's sizes, to time every stage of a real run on.

    python bench/make_coco.py --fraction 1 --root /tmp/coco       # full size: about a minute on 2 cores
    python bench/make_coco.py --quick --root /tmp/coco_quick      # a few dozen pictures, seconds

It writes COCO's layout and formats, so the scripts run on it with their COCO flags::

    ROOT/annotations/captions_train2014.json   {'info', 'images', 'licenses', 'annotations'}
    ROOT/annotations/captions_val2014.json
    ROOT/train2014/COCO_train2014_000000123456.jpg   small JPEGs (--width x --height)
    ROOT/val2014/COCO_val2014_000000654321.jpg

At --fraction 1 the counts are COCO's: 82,783 train pictures with 413,915 captions, 40,504 val
pictures with 202,520 captions. Captions are made-up words (syllables) drawn from a truncated
Zipf law tuned so that the training captions use about 24,000 distinct words, about 10,000 of
them at least 4 times (build_vocab.py's threshold), with the most frequent word near a fifth of
all tokens; lengths are 8 + Poisson(2.5) words (mean 10.5), some with a closing full stop, as
COCO's are. Annotation ids are shuffled across pictures, as COCO's are not grouped by picture.
The pictures carry no meaning: a background colour and a box, from the picture's id.
The same --seed and --fraction give the same files.
"""
import argparse
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

# MS-COCO 2014 (captions_{train,val}2014.json)
SIZES = {'train': (82_783, 413_915), 'val': (40_504, 202_520)}
# the truncated Zipf law of the words: p(rank r) ~ 1 / (r + SHIFT) ** EXPONENT, r = 1..POOL
POOL, EXPONENT, SHIFT = 31_000, 1.5, 1.5
MIN_WORDS, EXTRA_WORDS = 8, 2.5  # caption length: MIN_WORDS + Poisson(EXTRA_WORDS)
SYLLABLES = [c + v for c in 'bdfgklmnprstvz' for v in 'aeiou']  # 70; a word is 1-3 of them
QUICK_FRACTION = 0.0005  # 41 train and 20 val pictures


def made_up_words(rng):
    """POOL distinct lower-case words, the frequent ranks shortest (as in any language)."""
    base = len(SYLLABLES)
    order = rng.permutation(len(SYLLABLES))
    words = []
    for rank in range(POOL):
        n, digits = rank, []
        width = 1 if rank < base else 2 if rank < base ** 2 else 3
        for _ in range(width):
            n, d = divmod(n, base)
            digits.append(SYLLABLES[order[d]])
        words.append(''.join(digits))
    return words


def captions(rng, words, count):
    """`count` caption strings: 'Kaso belu ti...' with a full stop on about a third."""
    ranks = np.arange(1, POOL + 1)
    p = 1.0 / (ranks + SHIFT) ** EXPONENT
    lengths = MIN_WORDS + rng.poisson(EXTRA_WORDS, count)
    tokens = rng.choice(POOL, int(lengths.sum()), p=p / p.sum())
    stops = rng.random(count) < 0.35
    out, start = [], 0
    for length, stop in zip(lengths.tolist(), stops.tolist()):
        text = ' '.join(words[t] for t in tokens[start:start + length].tolist())
        start += length
        out.append(text[0].upper() + text[1:] + ('.' if stop else ''))
    return out


def split_sizes(fraction):
    """{'train': (pictures, captions), 'val': (...)} at `fraction` of COCO (at least 2 pictures)."""
    return {split: (max(2, round(images * fraction)), max(2, round(caps * fraction)))
            for split, (images, caps) in SIZES.items()}


def annotation_file(rng, split, image_ids, texts, first_ann_id, width, height):
    """COCO's caption JSON for one split: every picture gets len(texts) // len(image_ids) captions,
    the first len(texts) % len(image_ids) pictures one more."""
    n = len(image_ids)
    owners = np.repeat(np.arange(n), len(texts) // n)
    owners = np.concatenate([owners, np.arange(len(texts) % n)])
    ann_ids = first_ann_id + rng.permutation(len(texts))  # COCO's ids do not follow the pictures
    images = [{'license': 1, 'file_name': f'COCO_{split}2014_{i:012d}.jpg',
               'coco_url': f'http://images.cocodataset.org/{split}2014/COCO_{split}2014_{i:012d}.jpg',
               'height': height, 'width': width, 'date_captured': '2013-11-14 16:28:13',
               'flickr_url': '', 'id': i} for i in image_ids.tolist()]
    annotations = sorted(({'image_id': int(image_ids[o]), 'id': int(a), 'caption': t}
                          for o, a, t in zip(owners.tolist(), ann_ids.tolist(), texts)), key=lambda a: a['id'])
    return {'info': {'description': 'synthetic data at MS-COCO 2014 sizes (bench/make_coco.py)',
                     'version': '1.0', 'year': 2014, 'date_created': '2015-01-27 09:11:52.357475'},
            'images': images,
            'licenses': [{'url': 'http://creativecommons.org/licenses/by/2.0/', 'id': 1,
                          'name': 'Attribution License'}],
            'annotations': annotations}


def write_pictures(job):
    """Write the JPEGs of one chunk: job = (folder, split, image ids, width, height)."""
    folder, split, ids, width, height = job
    for i in ids:
        r = np.random.default_rng(i)
        colour, box = tuple(r.integers(0, 256, 3).tolist()), tuple(r.integers(0, 256, 3).tolist())
        x0, y0 = int(r.integers(0, width // 2)), int(r.integers(0, height // 2))
        image = Image.new('RGB', (width, height), colour)
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + width // 3, y0 + height // 3], fill=box)
        image.save(os.path.join(folder, f'COCO_{split}2014_{i:012d}.jpg'), quality=90)
    return len(ids)


def write_json(path, content):
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(content, f)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--root', type=str, default='data/coco_synthetic', help='folder to write into')
    parser.add_argument('--fraction', type=float, default=1.0, help="share of COCO 2014's sizes (1: full size)")
    parser.add_argument('--quick', action='store_true', help=f'--fraction {QUICK_FRACTION}: a few dozen pictures')
    parser.add_argument('--width', type=int, default=64, help='picture width')
    parser.add_argument('--height', type=int, default=48, help='picture height')
    parser.add_argument('--num_workers', type=int, default=os.cpu_count() or 1, help='processes writing JPEGs')
    parser.add_argument('--seed', type=int, default=0, help='seeds the words, captions and picture ids')
    args = parser.parse_args(argv)
    if args.quick:
        args.fraction = QUICK_FRACTION
    if not 0 < args.fraction <= 1:
        parser.error(f'--fraction must be in (0, 1], got {args.fraction}')
    if args.width < 8 or args.height < 8:
        parser.error(f'--width and --height must be at least 8, got {args.width} x {args.height}')
    print(vars(args), flush=True)

    tic = time.time()
    rng = np.random.default_rng(args.seed)
    words = made_up_words(rng)
    sizes = split_sizes(args.fraction)
    # COCO's image ids are distinct across both splits, up to about 581,000
    all_ids = rng.choice(600_000, sum(n for n, _ in sizes.values()), replace=False) + 1
    os.makedirs(os.path.join(args.root, 'annotations'), exist_ok=True)
    jobs, start, first_ann_id = [], 0, 1
    for split, (num_images, num_captions) in sizes.items():
        image_ids = np.sort(all_ids[start:start + num_images])
        start += num_images
        texts = captions(rng, words, num_captions)
        path = os.path.join(args.root, 'annotations', f'captions_{split}2014.json')
        write_json(path, annotation_file(rng, split, image_ids, texts, first_ann_id, args.width, args.height))
        first_ann_id += num_captions
        print(f'wrote {path}: {num_images} pictures, {num_captions} captions ({time.time() - tic:.1f} s)', flush=True)
        folder = os.path.join(args.root, f'{split}2014')
        os.makedirs(folder, exist_ok=True)
        ids = image_ids.tolist()
        jobs += [(folder, split, ids[i:i + 500], args.width, args.height) for i in range(0, len(ids), 500)]

    total = sum(n for n, _ in sizes.values())
    done, last = 0, time.time()
    with Pool(max(1, args.num_workers)) as pool:
        for n in pool.imap_unordered(write_pictures, jobs):
            done += n
            if time.time() - last > 10 or done == total:  # a line every 10 s: this runs under nohup too
                last = time.time()
                print(f'pictures: {done}/{total} ({time.time() - tic:.0f} s)', flush=True)
    print(f'made {args.root} in {time.time() - tic:.1f} s', flush=True)


if __name__ == '__main__':
    sys.exit(main())
