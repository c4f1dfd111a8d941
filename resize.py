"""Resize every image in a folder to image_size x image_size RGB, for training.

The tutorial's preprocessing: each image is squashed (not cropped) to a square once,
so training only has to load small files and take random 224 x 224 crops of them.
File names stay the same, so the COCO caption files still point at the right images.
Finished images are kept: after an interruption, run the same command again.

Example:
    python resize.py --image_dir data/train2014/ --output_dir data/resized2014/ --image_size 256
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import functools
import io
import os
import sys
from multiprocessing import Pool

from PIL import Image

from images import to_rgb
from progress import Progress
from utils import HelpFormatter, atomic_write, fail, leave_signals_to_parent, remove_stale_temporaries, why_not_writable

PROG = 'resize.py'
COCO_IMAGES_URL = 'http://images.cocodataset.org/zips/train2014.zip'

# What Pillow raises for a file that is not an image, or a damaged one. Anything else
# (a bug, a full disk) should stop the run rather than be counted as a bad file.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# formats that store only palette or grayscale pictures: an RGB picture saved as one reads back as 'P'
PALETTE_FORMATS = ('GIF',)


def is_done(path, size):
    """True if path is already a complete output: a size x size image that decodes, in RGB
    (or in the palette its format is limited to)."""
    try:
        with Image.open(path) as image:
            image.load()  # decode it all: a truncated file fails here, not at training time
            return image.size == (size, size) and (image.mode == 'RGB' or image.format in PALETTE_FORMATS)
    except READ_ERRORS:  # missing (FileNotFoundError is an OSError), truncated, or not an image
        return False


def save_format(name):
    """Pillow format for an output file: the one its extension says, so name and content
    agree; PNG (lossless) for an extension Pillow cannot write."""
    Image.init()  # load every format plugin, so Image.SAVE is complete
    fmt = Image.registered_extensions().get(os.path.splitext(name)[1].lower())
    return fmt if fmt in Image.SAVE else 'PNG'


def resize_one(name, image_dir, output_dir, size):
    """Resize image_dir/name into output_dir/name. Returns (status, name, why) with status
    'done' (already there), 'resized', 'bad' (not an image, or corrupt; why says what) or
    'unwritable' (the output could not be written, e.g. a full disk; why says what)."""
    out = os.path.join(output_dir, name)
    if is_done(out, size):
        return 'done', name, None
    try:
        with Image.open(os.path.join(image_dir, name)) as image:  # read-only: the input may be a shared folder
            image = to_rgb(image).resize((size, size), Image.Resampling.LANCZOS)  # the tutorial's Image.ANTIALIAS
    except READ_ERRORS as e:
        return 'bad', name, f'{type(e).__name__}: {e}'
    # Encode in memory, then write the bytes under a temporary name and rename it. Pillow
    # writing straight into a file ignores a short write (a disk that fills up mid-picture)
    # and reports success on a truncated file; Python's own file writes raise instead.
    fmt = save_format(name)
    encoded = io.BytesIO()
    image.save(encoded, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))  # Pillow's default JPEG quality is 75
    try:
        # no fsync: a file cut short by a power cut fails is_done and is redone on the next run
        with atomic_write(out, 'wb', fsync=False) as f:
            f.write(encoded.getbuffer())
    except OSError as e:
        return 'unwritable', name, e.strerror or str(e)
    return 'resized', name, None


def run_all(work, names, num_workers):
    """Yield work(name) for every name: in num_workers processes, in whatever order they
    finish, or one by one in this process when num_workers is 0 or 1."""
    if num_workers <= 1:
        yield from map(work, names)
        return
    # up to 16 images per message keeps the pool's overhead small; fewer for a small
    # folder, so that every worker gets some
    chunksize = max(1, min(16, len(names) // (4 * num_workers)))
    with Pool(num_workers, initializer=leave_signals_to_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.imap_unordered(work, names, chunksize)


def stop(results, output_dir):
    """Stop the pool behind `results` (its workers are killed mid-picture, and waited for),
    then remove the temporary files of the pictures they were writing."""
    results.close()
    remove_stale_temporaries(output_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='resize.py', description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--image_dir', type=str, default='./data/train2014/', help='directory for train images')
    parser.add_argument('--output_dir', type=str, default='./data/resized2014/',
                        help='directory for saving resized images')
    parser.add_argument('--image_size', type=int, default=256, help='size for image after processing')
    parser.add_argument('--num_workers', type=int, default=None,
                        help='processes resizing in parallel (0 or 1: resize in this process); not given: one '
                             'per core, unlike train.py and evaluate.py, whose loaders share the machine with '
                             'the model')
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f'--image_size must be at least 1, got {args.image_size}')
    if args.num_workers is None:
        args.num_workers = os.cpu_count() or 1
    if args.num_workers < 0:
        parser.error(f'--num_workers must be at least 0, got {args.num_workers}')
    print(vars(args))

    if not os.path.isdir(args.image_dir):
        fail(PROG, f'image folder {args.image_dir} not found: download {COCO_IMAGES_URL} and unzip it into data/ '
             f'(or pass --image_dir)')
    if os.path.realpath(args.image_dir) == os.path.realpath(args.output_dir):
        fail(PROG, '--output_dir is --image_dir: resizing in place would overwrite the originals; give another folder')
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        fail(PROG, f'cannot make --output_dir {args.output_dir}: {e.strerror}')
    why = why_not_writable(args.output_dir)
    if why:
        fail(PROG, f'cannot write into --output_dir {args.output_dir} ({why}): pick a folder you can write to')

    # a run that was killed may have left temporary files: they are never finished images
    remove_stale_temporaries(args.output_dir)

    # sorted: the same order (and the same warnings) on every run; hidden files
    # (.DS_Store, our own temporary files) are not inputs
    names = sorted(n for n in os.listdir(args.image_dir)
                   if not n.startswith('.') and os.path.isfile(os.path.join(args.image_dir, n)))
    work = functools.partial(resize_one, image_dir=args.image_dir, output_dir=args.output_dir, size=args.image_size)
    counts, bad, unwritable = {'resized': 0, 'done': 0, 'bad': 0}, [], None
    results = run_all(work, names, args.num_workers)
    try:
        with Progress(results, total=len(names), desc='resizing', unit='images') as bar:
            for status, name, why in bar:
                if status == 'unwritable':
                    unwritable = os.path.join(args.output_dir, name), why
                    break
                counts[status] += 1
                if status == 'bad':
                    bad.append(name)
                    bar.write(f'warning: skipped {name}: not an image or corrupt ({why})', file=sys.stderr)
    except KeyboardInterrupt:
        stop(results, args.output_dir)
        # finished images are complete files (see resize_one), so nothing is lost
        print(f"interrupted after resizing {counts['resized']} images: run the same command again to finish",
              file=sys.stderr)
        sys.exit(130)
    stop(results, args.output_dir)
    if unwritable:
        fail(PROG, f"cannot write {unwritable[0]} ({unwritable[1]}): free some space (or pick another "
                   f"--output_dir) and run the same command again; the {counts['resized'] + counts['done']} "
                   f"pictures finished are complete and kept")

    listed = ', '.join(bad[:10]) + (f' and {len(bad) - 10} more' if len(bad) > 10 else '')
    print(f"Resized {counts['resized']} images, skipped {counts['done']} (already done), "
          f"{counts['bad']} not images/corrupt" + (f': {listed}' if bad else ''))
    print(f"Saved the resized images to '{args.output_dir}'")


if __name__ == '__main__':
    main()
