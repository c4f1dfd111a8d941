"""Build the vocabulary from COCO's training captions and save it as data/vocab.pkl.

Every word used at least --threshold times gets an id; rarer words become <unk>.

Example:
    python build_vocab.py --caption_path data/annotations/captions_train2014.json --threshold 4
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import os
from collections import Counter

from coco import load_coco
from progress import progress
from utils import HelpFormatter, fail
from vocab import SPECIAL_TOKENS, Vocabulary, save_vocab, tokenize

PROG = 'build_vocab.py'


def count_words(coco):
    """Counter of every token in every caption of a pycocotools COCO object."""
    counter = Counter()
    for ann in progress(coco.anns.values(), desc='tokenizing captions', unit='captions'):
        counter.update(tokenize(ann['caption']))
    return counter


def build_vocab(json, threshold):
    """The tutorial's function: the Vocabulary of the captions file json (a path)."""
    return Vocabulary.build(count_words(load_coco(json)), threshold)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='build_vocab.py', description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help='path for train annotation file')
    parser.add_argument('--vocab_path', type=str, default='data/vocab.pkl', help='path for saving vocabulary wrapper')
    parser.add_argument('--threshold', type=int, default=4, help='minimum word count threshold')
    args = parser.parse_args(argv)
    if args.threshold < 1:
        parser.error(f'--threshold must be at least 1, got {args.threshold}')
    print(vars(args))

    # check the cheap things before tokenizing 400k captions
    if os.path.isdir(args.vocab_path):
        fail(PROG, f'--vocab_path {args.vocab_path} is a folder: give a file name, e.g. {args.vocab_path}/vocab.pkl')
    try:
        coco = load_coco(args.caption_path)  # refuses a missing, truncated or non-caption file in one line
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, e)
    counter = count_words(coco)

    vocab = Vocabulary.build(counter, args.threshold)
    try:
        save_vocab(vocab, args.vocab_path)
    except OSError as e:
        fail(PROG, f'cannot write {args.vocab_path} ({e.strerror or e}): pass a --vocab_path you can write to')
    kept = len(vocab) - len(SPECIAL_TOKENS)
    print(f'Kept {kept} of {len(counter)} distinct words (used at least {args.threshold} times)')
    print(f'Total vocabulary size: {len(vocab)}')
    print(f"Saved the vocabulary wrapper to '{args.vocab_path}'")


if __name__ == '__main__':
    main()
