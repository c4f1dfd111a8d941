"""Caption every image of a COCO caption file and score the captions the COCO way.

    $ python evaluate.py --checkpoint models/best.pt          # the 40,504 val2014 images, beam size 3

Writes the captions in COCO's results format, [{"image_id": 391895, "caption": "a man riding a
bike down a road"}, ...], to --results_path, then prints BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
of pycocoevalcap (the COCO caption server's implementations, through metrics.py) against all
the reference captions of each image, on the 0-100 scale papers use. METEOR needs Java: without
it, it is reported as skipped. Tokenisation never needs Java (metrics.ptb_tokenize).

Karpathy's split (the one papers report on: 5,000 val2014 images for test, 5,000 for val) comes
from his dataset_coco.json, in http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip:

    $ python evaluate.py --split_file data/dataset_coco.json --split test
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from checkpoint import EncoderWeightsError, add_decoding_args, add_model_args, load_captioner
from coco import load_coco
from data_loader import load_image, worker_init_fn
from metrics import format_scores, score_captions
from progress import Progress
from utils import HelpFormatter, atomic_write, fail, why_not_writable

PROG = 'evaluate.py'
KARPATHY_URL = 'http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip'


def get_args(argv=None):
    parser = argparse.ArgumentParser(prog='evaluate.py', description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    # data
    parser.add_argument('--image_dir', type=str, default='data/resizedval2014', help='images made by resize.py')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_val2014.json',
                        help='COCO-format caption file: the images to caption and their reference captions')
    parser.add_argument('--split_file', type=str, default=None,
                        help=f"Karpathy's dataset_coco.json (from {KARPATHY_URL}): caption only the images of "
                             f"--split, matched to --caption_path by cocoid; not given: every image of --caption_path")
    parser.add_argument('--split', type=str, default=None, choices=['test', 'val', 'train', 'restval'],
                        help="which split of --split_file; not given: 'test'")
    parser.add_argument('--max_images', type=int, default=0,
                        help='caption only the first this many images, by image id (0: all)')
    # model: a checkpoint of train.py, or the tutorial's three files (as sample.py)
    add_model_args(parser)
    # decoding (beam search, as papers report)
    add_decoding_args(parser, beam_size=3)
    # output and speed
    parser.add_argument('--results_path', type=str, default=None,
                        help='COCO results JSON to write; not given: captions_<split>_results.json beside the model')
    parser.add_argument('--batch_size', type=int, default=64, help='images per batch')
    parser.add_argument('--num_workers', type=int, default=2, help='image loading processes (as train.py\'s)')
    parser.add_argument('--seed', type=int, default=0, help='seeds torch (decoding itself is deterministic)')
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="'cpu', 'cuda', 'cuda:1', 'mps'")
    args = parser.parse_args(argv)
    for name in ('beam_size', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.max_seq_length is not None and args.max_seq_length < 1:
        parser.error(f'--max_seq_length must be at least 1, got {args.max_seq_length}')
    if args.max_images < 0:
        parser.error(f'--max_images must be 0 (all) or more, got {args.max_images}')
    if args.num_workers < 0:
        parser.error(f'--num_workers must be 0 or more, got {args.num_workers}')
    if args.length_penalty < 0:
        parser.error(f'--length_penalty must be 0 or more, got {args.length_penalty}')
    if args.split is not None and args.split_file is None:
        parser.error('--split needs --split_file (Karpathy\'s dataset_coco.json)')
    if args.split_file is not None and args.split is None:
        args.split = 'test'
    if any(p is not None for p in (args.encoder_path, args.decoder_path, args.vocab_path)) and args.checkpoint:
        parser.error('give either --checkpoint or --encoder_path/--decoder_path/--vocab_path, not both')
    return args


# ---------------------------------------------------------------------------
# What to caption, and the references

def read_json(path, what, fix):
    if not os.path.isfile(path):
        fail(PROG, f'{what} {path} not found: {fix}')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(PROG, f'{path} is not a readable JSON file ({type(e).__name__}): {fix}')


def load_references(caption_path):
    """COCO caption file -> ({image_id: file_name}, {image_id: [reference captions]}), for the
    captioned images only (an image without captions cannot be scored)."""
    try:
        coco = load_coco(caption_path)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, e)
    refs = {i: [str(a['caption']) for a in anns] for i, anns in coco.imgToAnns.items() if anns}
    return {i: coco.imgs[i]['file_name'] for i in refs}, refs


def karpathy_ids(split_file, split):
    """The cocoids of one split of Karpathy's dataset_coco.json, in file order."""
    data = read_json(split_file, 'split file', f'download caption_datasets.zip from {KARPATHY_URL} and pass '
                     f'the dataset_coco.json inside it')
    try:
        return [int(im['cocoid']) for im in data['images'] if im['split'] == split]
    except (KeyError, TypeError, ValueError):
        fail(PROG, f"{split_file} is not Karpathy's dataset_coco.json (images with 'split' and 'cocoid'): "
             f"use the one in {KARPATHY_URL}")


class EvalImages(Dataset):
    """One item per image: (image (3, crop, crop), image id, error message or '').

    The preprocessing is sample.py's (data_loader.load_image: resize to image_size,
    centre crop). A picture that fails to load comes back as its error message, so that
    the main process can say which one in a line (a raise in a worker would come with
    two tracebacks).
    """

    def __init__(self, paths, image_ids, image_size, crop_size):
        self.paths, self.image_ids = paths, image_ids
        self.image_size, self.crop_size = image_size, crop_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = load_image(self.paths[index], self.image_size, self.crop_size).squeeze(0)  # (3, crop, crop)
            error = ''
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            image = torch.zeros(3, self.crop_size, self.crop_size)
            error = f'{self.paths[index]} is not a picture Pillow can read ({type(e).__name__})'
        return image, self.image_ids[index], error


# ---------------------------------------------------------------------------
# Captioning

@torch.no_grad()
def caption_images(captioner, loader, device, beam_size, length_penalty, max_seq_length):
    """Caption every image of the loader -> {image_id: caption}, showing progress."""
    results = {}
    with Progress(total=len(loader.dataset), desc='captioning', unit='images') as bar:
        for images, image_ids, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                bar.close(quiet=True)
                fail(PROG, f'{bad[0]}: re-run resize.py on it, or remove it from the caption file')
            features = captioner.encoder(images.to(device, non_blocking=True))  # (N, E)
            ids = captioner.decoder.generate(features, beam_size=beam_size, length_penalty=length_penalty,
                                             max_seq_length=max_seq_length)
            captions = [captioner.vocab.decode(c, markers=False) for c in ids]
            results.update(zip(image_ids.tolist(), captions))
            bar.update(len(captions))
    return results


def write_results(results, path):
    """[{"image_id": int, "caption": str}, ...] by image id, written atomically (tmp + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, 'w') as f:
        json.dump([{'image_id': i, 'caption': results[i]} for i in sorted(results)], f)


def interrupted(what):
    """Ctrl-C: one line saying what is on disk, exit code 130."""
    print(f'\ninterrupted: {what}', flush=True)
    sys.exit(130)


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    # Everything about the input is checked before the model is built and the long run starts
    files, refs = load_references(args.caption_path)
    if args.split_file:
        wanted = karpathy_ids(args.split_file, args.split)
        if not wanted:
            fail(PROG, f"{args.split_file} has no '{args.split}' images: is it Karpathy's dataset_coco.json?")
        image_ids = sorted(set(i for i in wanted if i in files))
        if not image_ids:
            fail(PROG, f"none of the {len(wanted)} '{args.split}' images of {args.split_file} are in {args.caption_path}: "
                 f"pass the caption file of the COCO images they come from (--caption_path, --image_dir)")
        if len(image_ids) < len(set(wanted)):
            print(f"note: {len(set(wanted)) - len(image_ids)} of the {len(set(wanted))} '{args.split}' images are "
                  f"not in {args.caption_path}; evaluating the other {len(image_ids)}", file=sys.stderr)
        label = f"Karpathy's {args.split} split"
        split_name = args.split
    else:
        image_ids = sorted(files)
        if not image_ids:
            fail(PROG, f'{args.caption_path} has no captioned images')
        split_name = os.path.splitext(os.path.basename(args.caption_path))[0].replace('captions_', '')
        label = split_name
    if args.max_images:
        image_ids = image_ids[:args.max_images]
    if not os.path.isdir(args.image_dir):
        fail(PROG, f'image folder {args.image_dir} not found: resize the images first, e.g. '
             f'python resize.py --image_dir data/val2014 --output_dir {args.image_dir}')
    paths = [os.path.join(args.image_dir, files[i]) for i in image_ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        fail(PROG, f'{len(missing)} of the {len(paths)} images are not in {args.image_dir}, e.g. {missing[0]}: '
             f'resize them first (python resize.py --output_dir {args.image_dir}) or pass --image_dir')

    if args.results_path is None:
        where = os.path.dirname(args.checkpoint or args.decoder_path or '') or args.model_path
        args.results_path = os.path.join(where, f'captions_{split_name}_results.json')
    why = why_not_writable(os.path.dirname(os.path.abspath(args.results_path)))
    if why:
        fail(PROG, f'cannot write {args.results_path} ({why}): pass --results_path in a folder you can write to')

    try:
        captioner = load_captioner(checkpoint=args.checkpoint, encoder_path=args.encoder_path,
                                   decoder_path=args.decoder_path, vocab_path=args.vocab_path,
                                   model_path=args.model_path, encoder_weights=args.encoder_weights, device=device)
    except (FileNotFoundError, ValueError, EncoderWeightsError) as e:
        fail(PROG, e)
    print(f'model: {captioner.source}')
    print(f'captioning {len(image_ids)} images of {label} ({args.caption_path}), beam size {args.beam_size}')

    dataset = EvalImages(paths, image_ids, captioner.image_size, captioner.crop_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == 'cuda', worker_init_fn=worker_init_fn)
    try:
        results = caption_images(captioner, loader, device, args.beam_size, args.length_penalty, args.max_seq_length)
    except KeyboardInterrupt:
        interrupted('nothing written')
    try:
        write_results(results, args.results_path)
    except OSError as e:  # a full disk: the temporary file is gone, an older results file is intact
        fail(PROG, f'cannot write {args.results_path} ({e.strerror or e}): free some space or pass another --results_path')
    print(f'wrote {len(results)} captions to {args.results_path}')
    for i in list(results)[:3]:
        print(f'  {i}: {results[i]}')

    try:
        scores, skipped = score_captions({i: refs[i] for i in results}, results, verbose=True)
    except KeyboardInterrupt:
        interrupted(f'the captions are in {args.results_path}, not scored')
    print(f'\nCOCO caption metrics (pycocoevalcap) on {len(results)} images of {label}, beam size {args.beam_size}; '
          f'scores on the 0-100 scale of papers (pycocoevalcap\'s 0-1 values x 100):')
    print(format_scores(scores, skipped))
    return scores


if __name__ == '__main__':
    main()
