"""The whole job on the built-in shapes data set: offline, on a CPU, in a few minutes.

    $ python demo.py

It runs the lab's own scripts with other flags, exactly as a COCO run would:

    make_shapes.py -> build_vocab.py -> resize.py -> train.py -> evaluate.py -> captions
    (pictures and     (vocab.pkl)       (train, val)  (features    (BLEU, METEOR,  (held-out pictures,
     COCO captions)                                    cached once)  ROUGE-L, CIDEr)  written to --output)

and ends with a check that the captions come from the pictures: BLEU-4 of the held-out
captions against BLEU-4 of the same model fed the wrong pictures (features shuffled).
It uses the ImageNet ResNet-152 weights when torch's cache has them (or can download
them), and otherwise random encoder weights, after saying so.
"""
import argparse
import os
import sys
import time

import torch

import build_vocab
import evaluate
import make_shapes
import metrics
import resize
import train
from checkpoint import EncoderWeightsError, encoder_id, encoder_spec, ensure_imagenet_weights, load_captioner
from feature_cache import FeatureCache
from evaluate import caption_features
from sample import draw_caption
from vocab import tokenize


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    parser.add_argument('--data_dir', type=str, default='data/shapes', help='where the built-in set is made')
    parser.add_argument('--num_train', type=int, default=1500, help='training pictures (5 captions each)')
    parser.add_argument('--num_val', type=int, default=150, help='held-out pictures')
    parser.add_argument('--image_size', type=int, default=96, help='picture size (resize.py --image_size)')
    parser.add_argument('--crop_size', type=int, default=84, help='centre crop fed to the ResNet')
    # model and training (train.py's flags; the model is the tutorial's)
    parser.add_argument('--model_path', type=str, default='models/shapes', help='checkpoints and logs')
    parser.add_argument('--encoder_weights', type=str, default='auto',
                        help="'auto' (ImageNet if available, else random), 'imagenet', 'none' or a path")
    parser.add_argument('--embed_size', type=int, default=256)
    parser.add_argument('--hidden_size', type=int, default=512)
    parser.add_argument('--num_epochs', type=int, default=6)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--learning_rate', type=float, default=0.002)
    parser.add_argument('--num_workers', type=int, default=2)
    # output
    parser.add_argument('--output', type=str, default='demo_out', help='captioned held-out pictures go here')
    parser.add_argument('--examples', type=int, default=6, help='held-out pictures printed and drawn')
    parser.add_argument('--beam_size', type=int, default=3, help='beam width for evaluation and examples')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args(argv)


def banner(text):
    print(f'\n=== {text} ' + '=' * max(0, 70 - len(text)), flush=True)


def choose_weights(choice):
    """'auto': the ImageNet weights when torch's cache has them or a download works, else
    random weights, after one line saying so and how to get the real ones."""
    if choice != 'auto':
        return choice
    try:
        ensure_imagenet_weights()
        return 'imagenet'
    except EncoderWeightsError as e:
        print(f'note: running on random encoder weights. {e}. With the real weights the captions '
              f'also get the shapes right.')
        return 'none'


def shuffled(n, seed):
    """A permutation with no fixed point: every picture gets another picture's features."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    wrong = torch.empty_like(perm)
    wrong[perm] = perm.roll(1)
    return wrong


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    start = time.time()
    data, seed = args.data_dir, str(args.seed)
    weights = choose_weights(args.encoder_weights)
    images, annotations = os.path.join(data, 'images'), os.path.join(data, 'annotations')
    resized = os.path.join(data, f'resized{args.image_size}')
    vocab_path = os.path.join(data, 'vocab.pkl')
    train_json = os.path.join(annotations, 'captions_train.json')
    val_json = os.path.join(annotations, 'captions_val.json')

    banner('1/6 make_shapes.py: the built-in caption set')
    make_shapes.main(['--output_dir', data, '--num_train', str(args.num_train), '--num_val', str(args.num_val),
                      '--image_size', str(args.image_size), '--seed', seed])
    banner('2/6 build_vocab.py')
    build_vocab.main(['--caption_path', train_json, '--vocab_path', vocab_path, '--threshold', '1'])
    banner('3/6 resize.py: train and val pictures')
    for split in ('train', 'val'):
        resize.main(['--image_dir', os.path.join(images, split), '--output_dir', os.path.join(resized, split),
                     '--image_size', str(args.image_size), '--num_workers', str(args.num_workers)])

    banner('4/6 train.py')
    # --augment none: centre crops, so the frozen ResNet runs once per picture (feature cache).
    # --recalibrate_bn: a run this short leaves the encoder's BatchNorm statistics (momentum
    # 0.01) unsettled, so evaluation re-estimates them first; a COCO run never needs this.
    train.main(['--image_dir', os.path.join(resized, 'train'), '--caption_path', train_json,
                '--val_image_dir', os.path.join(resized, 'val'), '--val_caption_path', val_json,
                '--vocab_path', vocab_path, '--model_path', args.model_path, '--encoder_weights', weights,
                '--image_size', str(args.image_size), '--crop_size', str(args.crop_size),
                '--embed_size', str(args.embed_size), '--hidden_size', str(args.hidden_size),
                '--num_epochs', str(args.num_epochs), '--batch_size', str(args.batch_size),
                # features come from a memory-mapped file: worker processes would only add start-up time
                '--learning_rate', str(args.learning_rate), '--num_workers', '0',
                '--log_step', '25', '--augment', 'none', '--recalibrate_bn', '50',
                '--seed', seed, '--device', args.device])
    best = os.path.join(args.model_path, 'best.pt')

    banner('5/6 evaluate.py: COCO caption metrics on the held-out pictures')
    evaluate.main(['--image_dir', os.path.join(resized, 'val'), '--caption_path', val_json, '--checkpoint', best,
                   '--beam_size', str(args.beam_size), '--num_workers', '0', '--device', args.device,
                   '--results_path', os.path.join(args.model_path, 'captions_val_results.json')])

    banner('6/6 held-out pictures: the model\'s caption and a reference caption')
    device = torch.device(args.device)
    captioner = load_captioner(best, device=device)
    names, refs = evaluate.load_references(val_json)  # {id: file name}, {id: [captions]}
    # the ResNet features of the held-out pictures are in train.py's cache already (centre crops)
    cache = FeatureCache(root=os.path.join(resized, 'val'), json=val_json, crop_size=args.crop_size, views=1,
                         encoder_id=encoder_id(encoder_spec(weights, args.seed)), seed=args.seed)
    pooled = torch.tensor(cache.load_or_build(captioner.encoder, device)[0])  # (N, 2048), sorted ids; a copy
    ids = [i for i in cache.image_ids if i in refs]
    pooled = pooled[[cache.row[i] for i in ids]]
    paths = [os.path.join(resized, 'val', names[i]) for i in ids]
    with torch.no_grad():
        features = captioner.encoder.project(pooled.to(device))  # (N, E)
        captions = caption_features(captioner.decoder, features, captioner.vocab, beam_size=args.beam_size)
        wrong = caption_features(captioner.decoder, features[shuffled(len(ids), args.seed)], captioner.vocab,
                                 beam_size=args.beam_size)
    os.makedirs(args.output, exist_ok=True)
    for i, path, caption in list(zip(ids, paths, captions))[:args.examples]:
        reference = ' '.join(tokenize(refs[i][0]))
        print(f'{os.path.basename(path)}\n    model:     {caption}\n    reference: {reference}')
        draw_caption(path, caption, os.path.join(args.output, os.path.basename(path)))
    exact = sum(c in {' '.join(tokenize(r)) for r in refs[i]} for i, c in zip(ids, captions))
    real = metrics.bleu4(refs, dict(zip(ids, captions)))
    shuffled_bleu = metrics.bleu4(refs, dict(zip(ids, wrong)))
    print(f'\nheld-out pictures: {len(ids)}; captions equal to one of the references: {exact} ({exact / len(ids):.0%})')
    print(f'BLEU-4 (0-100) of the captions: {real:.1f}; of the same model fed the wrong pictures: '
          f'{shuffled_bleu:.1f} -> {"the captions come from the pictures" if real > shuffled_bleu + 5 else "no clear evidence the captions use the pictures"}')
    if weights == 'none':
        print('(encoder on random weights: its features keep colours, sizes and places, counts weakly and '
              'shapes not at all: see make_shapes.py --probe; ImageNet weights see the shapes too)')
    print(f'wrote {min(args.examples, len(ids))} captioned pictures to {args.output}/; '
          f'checkpoint {best}; done in {time.time() - start:.0f} s')
    print(f'caption any picture with: python sample.py --checkpoint {best} --image {paths[0]}')
    return {'bleu4': real, 'bleu4_shuffled': shuffled_bleu, 'exact': exact / len(ids)}


if __name__ == '__main__':
    main()
