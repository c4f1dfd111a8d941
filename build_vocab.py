"""Build the vocabulary from COCO's training captions and save it as data/vocab.pkl.

Every word used at least --threshold times gets an id; rarer words become <unk>.

Example:
    python build_vocab.py --caption_path data/annotations/captions_train2014.json --threshold 4
"""
import argparse
import os
import sys
from collections import Counter

from pycocotools.coco import COCO
from tqdm import tqdm

from vocab import SPECIAL_TOKENS, Vocabulary, save_vocab, tokenize

COCO_ANNOTATIONS_URL = 'http://images.cocodataset.org/annotations/annotations_trainval2014.zip'


def count_words(coco):
    """Counter of every token in every caption of a pycocotools COCO object."""
    counter = Counter()
    for ann in tqdm(coco.anns.values(), desc='tokenizing captions', unit=' captions'):
        counter.update(tokenize(ann['caption']))
    return counter


def build_vocab(json, threshold):
    """The tutorial's function: the Vocabulary of the captions file json (a path)."""
    return Vocabulary.build(count_words(COCO(json)), threshold)


def fail(message):
    """Bad input: one line saying what is wrong and how to fix it, exit code 2, no traceback."""
    print(f'build_vocab.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='build_vocab.py', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help='path for train annotation file')
    parser.add_argument('--vocab_path', type=str, default='data/vocab.pkl', help='path for saving vocabulary wrapper')
    parser.add_argument('--threshold', type=int, default=4, help='minimum word count threshold')
    args = parser.parse_args(argv)
    if args.threshold < 1:
        parser.error(f'--threshold must be at least 1, got {args.threshold}')
    print(vars(args))

    # check the cheap things before tokenizing 400k captions
    if not os.path.isfile(args.caption_path):
        fail(f'{args.caption_path} not found: download {COCO_ANNOTATIONS_URL} and unzip it into data/ '
             f'(or pass --caption_path)')
    if os.path.isdir(args.vocab_path):
        fail(f'--vocab_path {args.vocab_path} is a folder: give a file name, e.g. {args.vocab_path}/vocab.pkl')
    try:
        coco = COCO(args.caption_path)
    except (ValueError, AssertionError, KeyError):  # json.JSONDecodeError is a ValueError; COCO asserts a dict
        fail(f'{args.caption_path} is not a COCO annotation file (JSON with "images" and "annotations")')
    if not coco.anns:
        fail(f'{args.caption_path} holds no captions')
    if not all('caption' in ann for ann in coco.anns.values()):  # e.g. instances_train2014.json
        fail(f'{args.caption_path} has annotations without a "caption": pass a captions_*.json file')
    counter = count_words(coco)

    vocab = Vocabulary.build(counter, args.threshold)
    try:
        save_vocab(vocab, args.vocab_path)
    except OSError as e:
        fail(f'cannot write {args.vocab_path}: {e.strerror}')
    kept = len(vocab) - len(SPECIAL_TOKENS)
    print(f'Kept {kept} of {len(counter)} distinct words (used at least {args.threshold} times)')
    print(f'Total vocabulary size: {len(vocab)}')
    print(f"Saved the vocabulary wrapper to '{args.vocab_path}'")


if __name__ == '__main__':
    main()
