"""The whole job on the built-in shapes data set: offline, on a CPU, in a couple of minutes.

    $ python demo.py

It runs the lab's own scripts with other flags, exactly as a COCO run would:

    make_shapes.py -> build_vocab.py -> resize.py -> train.py -> evaluate.py -> captions
    (pictures and     (vocab.pkl)       (train, val)  (features    (BLEU, METEOR,  (held-out pictures,
     COCO captions)                                    cached once)  ROUGE-L, CIDEr)  written to --output)

and ends with a check that the captions come from the pictures: BLEU-4 and CIDEr-D of the
held-out captions against the same model fed the wrong pictures (features shuffled), how
often the captions name each attribute of the scene right, then the time each stage took.
--decoder attention runs the same job with Show, Attend and Tell's decoder, and also draws
where it looked for each word of the first held-out picture (docs/attention.md).
It uses the ImageNet ResNet-152 weights when torch's cache has them (or can download
them), and otherwise random encoder weights, after saying so. Where the CPU computes
bfloat16 natively (Intel AMX or AVX512-BF16), train.py runs under bf16 autocast, its
feature cache included: most of the demo's time is the frozen ResNet's one pass over
the pictures, and bf16 is several times faster there (--amp off: float32).
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import contextlib
import json
import os
import time

import torch

import build_vocab
import evaluate
import make_shapes
import metrics
import resize
import train
from checkpoint import EncoderWeightsError, encoder_id, encoder_spec, ensure_imagenet_weights, load_captioner
from feature_cache import FeatureCache, native_bf16
from sample import draw_caption
from vocab import tokenize
from utils import HelpFormatter


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    # data
    parser.add_argument('--data_dir', type=str, default='data/shapes', help='where the built-in set is made')
    parser.add_argument('--num_train', type=int, default=1500, help='training pictures (5 captions each)')
    parser.add_argument('--num_val', type=int, default=150, help='held-out pictures')
    parser.add_argument('--image_size', type=int, default=96, help='picture size (resize.py --image_size)')
    parser.add_argument('--crop_size', type=int, default=84, help='centre crop fed to the ResNet')
    # model and training (train.py's flags; the model is the tutorial's)
    parser.add_argument('--model_path', type=str, default=None,
                        help='checkpoints and logs; not given: models/shapes, or models/shapes_attention')
    parser.add_argument('--decoder', type=str, default='rnn', choices=['rnn', 'attention'],
                        help="train.py --decoder: the tutorial's DecoderRNN or the attention decoder")
    parser.add_argument('--grid_size', type=int, default=3,
                        help='--decoder attention: regions per side (the ResNet map of an 84 crop is 3 x 3)')
    parser.add_argument('--encoder_weights', type=str, default='auto',
                        help="'auto' (ImageNet if available, else random), 'imagenet', 'none' or a path")
    parser.add_argument('--embed_size', type=int, default=256, help='dimension of word embedding vectors')
    parser.add_argument('--hidden_size', type=int, default=512, help='dimension of lstm hidden states')
    # the validation loss stops falling after about 5 epochs: more would cost time, not change best.pt
    parser.add_argument('--num_epochs', type=int, default=5, help='passes over the training captions')
    parser.add_argument('--batch_size', type=int, default=64, help='captions per step, and crops per ResNet pass')
    parser.add_argument('--learning_rate', type=float, default=0.002, help="Adam's step size")
    parser.add_argument('--num_workers', type=int, default=2, help='resize.py processes')
    parser.add_argument('--amp', type=str, default='auto', choices=['auto', 'bf16', 'off'],
                        help="train.py's autocast, its feature cache included; auto: bf16 where the device "
                             "computes it natively (CPUs with AMX or AVX512-BF16, CUDA GPUs from Ampere on), "
                             "else off (float32)")
    # output
    parser.add_argument('--output', type=str, default=None,
                        help='captioned held-out pictures go here; not given: demo_out, or demo_out_attention')
    parser.add_argument('--examples', type=int, default=6, help='held-out pictures printed and drawn')
    parser.add_argument('--beam_size', type=int, default=3, help='beam width for evaluation and examples')
    parser.add_argument('--seed', type=int, default=0, help='seeds the pictures, the random encoder and training')
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="'cpu', 'cuda', 'cuda:1', 'mps'")
    args = parser.parse_args(argv)
    suffix = '_attention' if args.decoder == 'attention' else ''
    args.model_path = args.model_path or f'models/shapes{suffix}'
    args.output = args.output or f'demo_out{suffix}'
    return args


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


def choose_amp(choice, device):
    """'auto' -> 'bf16' where `device` computes bfloat16 natively, else 'off'."""
    if choice != 'auto':
        return choice
    return 'bf16' if native_bf16(device) else 'off'


class Stages:
    """Wall-clock seconds of each stage, printed as a table at the end::

        stages = Stages()
        with stages('train.py'):
            ...
        stages.part('train.py', 'feature cache', 12.3, rest='epochs')  # a part it timed itself
        print(stages.table())
    """

    def __init__(self):
        self.rows, self.parts, self.rest = [], {}, {}

    @contextlib.contextmanager
    def __call__(self, name):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.rows.append((name, time.perf_counter() - tic))

    def part(self, stage, name, seconds, rest='the rest'):
        self.parts.setdefault(stage, []).append((name, seconds))
        self.rest[stage] = rest

    def table(self):
        lines = [f'{"stage":<44}{"seconds":>8}']
        for name, seconds in self.rows:
            lines.append(f'{name:<44}{seconds:>8.1f}')
            parts = self.parts.get(name, [])
            rest = [(self.rest.get(name), seconds - sum(t for _, t in parts))] if parts else []
            for part, part_seconds in parts + rest:
                lines.append(f'    {part:<40}{part_seconds:>8.1f}')
        lines.append(f'{"total":<44}{sum(t for _, t in self.rows):>8.1f}')
        return '\n'.join(lines)


def build_seconds(cache, encoder, since):
    """Seconds the cache's ResNet pass took, if it was built after `since` (a time.time());
    else 0 (it was read from disk)."""
    if cache.load(encoder) is None or os.path.getmtime(cache.meta_path) < since:
        return 0.0
    with open(cache.meta_path) as f:
        return json.load(f)['build_seconds']


def shuffled(n, seed):
    """A permutation with no fixed point: every picture gets another picture's features."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    wrong = torch.empty_like(perm)
    wrong[perm] = perm.roll(1)
    return wrong


def read_attributes(caption):
    """The scene a make_shapes.py caption describes, as far as it says: a dict with some of
    make_shapes.ATTRIBUTES, e.g. 'two large red circles on the left of a blue image' ->
    {'count': 2, 'size': 'large', 'colour': 'red', 'shape': 'circle', 'position': 'left',
    'background': 'blue'}. The object's colour is the one just before its shape (with the count
    and size before it); any other colour word is the background."""
    words, said = caption.split(), {}
    shapes = {**{s: s for s in make_shapes.SHAPES}, **{p: s for s, p in make_shapes.PLURAL.items()}}
    counts = {w: n for n, ws in make_shapes.COUNT_WORDS.items() for w in ws}
    sizes = {w: s for s, ws in make_shapes.SIZE_WORDS.items() for w in ws}
    positions = {p.split()[-1]: s for s, ps in make_shapes.POSITION_WORDS.items() for p in ps}
    at = next((k for k, w in enumerate(words) if w in shapes), None)
    if at is not None:
        said['shape'] = shapes[words[at]]
        before = words[max(0, at - 3):at]                     # e.g. ['two', 'large', 'red']
        if before and before[-1] in make_shapes.COLOURS:
            said['colour'] = before[-1]
        said.update({'size': sizes[w] for w in before if w in sizes})
        said.update({'count': counts[w] for w in before if w in counts})
    others = [w for k, w in enumerate(words) if w in make_shapes.COLOURS and (at is None or k != at - 1)]
    if others:
        said['background'] = others[0]
    said.update({'position': positions[w] for w in words if w in positions})
    return said


def attributes_named_right(scenes, captions):
    """{attribute: (share of the captions that name it right, share that name it at all)}."""
    said = [read_attributes(c) for c in captions]
    return {a: (sum(s.get(a) == scene[a] for s, scene in zip(said, scenes)) / len(scenes),
                sum(a in s for s in said) / len(scenes)) for a in make_shapes.ATTRIBUTES}


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    start, stages = time.time(), Stages()
    data, seed = args.data_dir, str(args.seed)
    weights = choose_weights(args.encoder_weights)
    amp = choose_amp(args.amp, args.device)
    images, annotations = os.path.join(data, 'images'), os.path.join(data, 'annotations')
    resized = os.path.join(data, f'resized{args.image_size}')
    vocab_path = os.path.join(data, 'vocab.pkl')
    train_json = os.path.join(annotations, 'captions_train.json')
    val_json = os.path.join(annotations, 'captions_val.json')

    banner('1/6 make_shapes.py: the built-in caption set')
    with stages('1 make_shapes.py'):
        make_shapes.main(['--output_dir', data, '--num_train', str(args.num_train), '--num_val', str(args.num_val),
                          '--image_size', str(args.image_size), '--seed', seed])
    banner('2/6 build_vocab.py')
    with stages('2 build_vocab.py'):
        build_vocab.main(['--caption_path', train_json, '--vocab_path', vocab_path, '--threshold', '1'])
    banner('3/6 resize.py: train and val pictures')
    with stages('3 resize.py'):
        for split in ('train', 'val'):
            resize.main(['--image_dir', os.path.join(images, split), '--output_dir', os.path.join(resized, split),
                         '--image_size', str(args.image_size), '--num_workers', str(args.num_workers)])

    banner('4/6 train.py')
    trained = time.time()
    # --augment none: centre crops, so the frozen ResNet runs once per picture (feature cache).
    # --recalibrate_bn: a run this short leaves the encoder's BatchNorm statistics (momentum
    # 0.01) unsettled, so evaluation re-estimates them first; a COCO run never needs this.
    with stages('4 train.py'):
        train.main(['--image_dir', os.path.join(resized, 'train'), '--caption_path', train_json,
                    '--val_image_dir', os.path.join(resized, 'val'), '--val_caption_path', val_json,
                    '--vocab_path', vocab_path, '--model_path', args.model_path, '--encoder_weights', weights,
                    '--image_size', str(args.image_size), '--crop_size', str(args.crop_size),
                    '--embed_size', str(args.embed_size), '--hidden_size', str(args.hidden_size),
                    '--num_epochs', str(args.num_epochs), '--batch_size', str(args.batch_size),
                    # features come from a memory-mapped file: worker processes would only add start-up time
                    '--learning_rate', str(args.learning_rate), '--num_workers', '0',
                    '--log_step', '25', '--augment', 'none', '--recalibrate_bn', '50', '--amp', amp,
                    '--decoder', args.decoder, '--grid_size', str(args.grid_size), '--seed', seed,
                    '--device', args.device])
    best = os.path.join(args.model_path, 'best.pt')

    banner('5/6 evaluate.py: COCO caption metrics on the held-out pictures')
    with stages('5 evaluate.py'):
        evaluate.main(['--image_dir', os.path.join(resized, 'val'), '--caption_path', val_json, '--checkpoint', best,
                       '--beam_size', str(args.beam_size), '--num_workers', '0', '--device', args.device,
                       '--results_path', os.path.join(args.model_path, 'captions_val_results.json')])

    banner('6/6 held-out pictures: the model\'s caption and a reference caption')
    with stages('6 captions, and the shuffled-picture control'):
        device = torch.device(args.device)
        captioner = load_captioner(best, device=device)
        # train.py's caches, found by the same key: the held-out features (centre crops) are in
        # one, and the time the ResNet took over the pictures is in both
        caches = [FeatureCache(root=os.path.join(resized, split), json=json_path, crop_size=args.crop_size, views=1,
                               encoder_id=encoder_id(encoder_spec(weights, args.seed)), seed=args.seed,
                               amp_dtype={'bf16': torch.bfloat16, 'off': None}[amp])
                  for split, json_path in (('train', train_json), ('val', val_json))]
        cache = caches[1]
        pooled = torch.tensor(cache.load_or_build(captioner.encoder, device)[0])  # (N, 2048), rows by id; a copy
        if cache.regions:
            pooled = pooled.view(len(pooled), cache.regions, -1)                    # (N, R, 2048)
        ids = cache.image_ids
        coco = cache.coco
        refs = {i: [str(ann['caption']) for ann in coco.imgToAnns[i]] for i in ids}
        paths = [os.path.join(resized, 'val', coco.imgs[i]['file_name']) for i in ids]
        with torch.no_grad():
            features = captioner.encoder.project(pooled.to(device))  # (N, E)
            decode = captioner.vocab.decode
            captions = [decode(c, markers=False)
                        for c in captioner.decoder.generate(features, beam_size=args.beam_size)]
            wrong = [decode(c, markers=False)
                     for c in captioner.decoder.generate(features[shuffled(len(ids), args.seed)], beam_size=args.beam_size)]
        os.makedirs(args.output, exist_ok=True)
        for i, path, caption in list(zip(ids, paths, captions))[:args.examples]:
            reference = ' '.join(tokenize(refs[i][0]))
            print(f'{os.path.basename(path)}\n    model:     {caption}\n    reference: {reference}')
            draw_caption(path, caption, os.path.join(args.output, os.path.basename(path)))
        exact = sum(c in {' '.join(tokenize(r)) for r in refs[i]} for i, c in zip(ids, captions))
        real = metrics.bleu4(refs, dict(zip(ids, captions)))
        shuffled_bleu = metrics.bleu4(refs, dict(zip(ids, wrong)))
        cider, shuffled_cider = metrics.cider_d(refs, dict(zip(ids, captions))), metrics.cider_d(refs, dict(zip(ids, wrong)))
        named = attributes_named_right([coco.imgs[i]['scene'] for i in ids], captions)
        if args.decoder == 'attention':
            import attention_map
            from data_loader import load_image
            figure = os.path.join(args.output, 'attention.png')
            picture = load_image(paths[0], captioner.image_size, captioner.crop_size).to(device)
            with torch.no_grad():
                attention_map.plot_attention(captioner.decoder, captioner.encoder(picture), picture, captioner.vocab,
                                             figure)
    resnet = sum(build_seconds(c, captioner.encoder, trained) for c in caches)
    stages.part('4 train.py', f'feature cache (ResNet, {"bf16" if amp == "bf16" else "float32"})', resnet,
                rest='start-up, epochs, validation')

    print(f'\nheld-out pictures: {len(ids)}; captions equal to one of the references: {exact} ({exact / len(ids):.0%})')
    verdict = ('the captions come from the pictures' if real > shuffled_bleu + 5 else
               'no clear evidence the captions use the pictures')
    print(f'BLEU-4 (0-100) of the captions: {real:.1f}; of the same model fed the wrong pictures: '
          f'{shuffled_bleu:.1f} -> {verdict}')
    print(f'CIDEr-D (0-1000) of the captions: {cider:.1f}; fed the wrong pictures: {shuffled_cider:.1f}')
    print('attributes the captions name right (share of the held-out pictures; named at all in brackets):')
    for attribute, (right, said) in named.items():
        print(f'    {attribute:<10} {right:.2f} ({said:.2f})')
    if weights == 'none':
        print('(encoder on random weights: its features keep colours, sizes and places, counts weakly and '
              'shapes not at all: see make_shapes.py --probe; ImageNet weights see the shapes too)')
    print(f'wrote {min(args.examples, len(ids))} captioned pictures to {args.output}/; checkpoint {best}')
    if args.decoder == 'attention':
        print(f'wrote where the decoder looked for each word of {os.path.basename(paths[0])} to {figure}')
    print(f'caption any picture with: python sample.py --checkpoint {best} --image {paths[0]}')
    print(f'\n{stages.table()}\n(done in {time.time() - start:.0f} s)')
    return {'bleu4': real, 'bleu4_shuffled': shuffled_bleu, 'cider': cider, 'cider_shuffled': shuffled_cider,
            'attributes': named, 'exact': exact / len(ids),
            'seconds': dict(stages.rows), 'amp': amp}


if __name__ == '__main__':
    main()
