"""Caption pictures with a trained model.

    $ python sample.py --image=png/example.png
    <start> a group of giraffes standing in a field . <end>

With no path flags it uses train.py's checkpoint in --model_path, named on stderr (or, when
there is none, the tutorial's pretrained files at their tutorial paths). --image takes one
or more pictures or folders; --output DIR writes each picture with its caption under it.
"""
import cpu_env  # noqa: F401  (first: OpenMP's settings must be in place before torch loads)
import argparse
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from checkpoint import EncoderWeightsError, add_decoding_args, add_model_args, load_captioner
from data_loader import load_image, open_rgb
from utils import HelpFormatter, atomic_write, fail, why_not_writable

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# where the tutorial's README put its pretrained model
TUTORIAL_FILES = ('models/encoder-5-3000.pkl', 'models/decoder-5-3000.pkl', 'data/vocab.pkl')


def get_args(argv=None):
    parser = argparse.ArgumentParser(prog='sample.py', description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--image', type=str, nargs='+', required=True, help='pictures or folders to caption')
    # model: a checkpoint of train.py, or the tutorial's three files
    add_model_args(parser)
    # decoding (greedy, the tutorial's)
    add_decoding_args(parser, beam_size=1)
    # output
    parser.add_argument('--output', type=str, default=None, help='folder for the captioned pictures (PNG)')
    parser.add_argument('--gates', type=str, default=None, metavar='OUT.png',
                        help="also draw the LSTM's gates while it writes the first picture's caption (PNG)")
    parser.add_argument('--attention', type=str, default=None, metavar='OUT.png',
                        help="also draw where a --decoder attention model looked for each word of the first "
                             "picture's caption (PNG)")
    parser.add_argument('--seed', type=int, default=0, help='seeds torch (decoding itself is deterministic)')
    parser.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="'cpu', 'cuda', 'cuda:1', 'mps'")
    args = parser.parse_args(argv)
    if args.beam_size < 1:
        parser.error(f'--beam_size must be at least 1, got {args.beam_size}')
    if args.max_seq_length is not None and args.max_seq_length < 1:
        parser.error(f'--max_seq_length must be at least 1, got {args.max_seq_length}')
    for flag in ('gates', 'attention'):
        if getattr(args, flag) and args.beam_size != 1:
            parser.error(f'--{flag} draws the greedy decoding: use it with --beam_size 1')
    given = [p is not None for p in (args.encoder_path, args.decoder_path, args.vocab_path)]
    if any(given) and args.checkpoint:
        parser.error('give either --checkpoint or --encoder_path/--decoder_path/--vocab_path, not both')
    return args


def find_images(paths):
    """Expand folders into their pictures, in name order; a file is taken as it is."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            images += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            images.append(path)
    return images


def caption_images(captioner, images, device, beam_size=1, length_penalty=0.0, max_seq_length=None):
    """Caption a list of (1, 3, crop, crop) tensors in one batch; returns token id lists."""
    batch = torch.cat(images).to(device)  # (N, 3, crop, crop)
    with torch.no_grad():
        features = captioner.encoder(batch)  # (N, E)
        return captioner.decoder.generate(features, beam_size=beam_size, length_penalty=length_penalty,
                                          max_seq_length=max_seq_length)


def draw_caption(path, caption, out_path):
    """Write the picture with its caption in a white band under it (PNG, atomically)."""
    image = open_rgb(path)
    width = 512  # a very tall picture is scaled to 2 widths high, so its canvas stays small
    scale = min(width / image.width, 2 * width / image.height)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    font = ImageFont.load_default(size=18)
    text = caption.replace('<start> ', '').replace(' <end>', '')
    lines, line = [], ''
    for word in text.split():  # wrap to the picture's width
        trial = f'{line} {word}'.strip()
        if line and font.getlength(trial) > width - 20:
            lines.append(line)
            trial = word
        line = trial
    lines.append(line)
    canvas = Image.new('RGB', (width, image.height + 10 + 24 * len(lines)), 'white')
    canvas.paste(image, ((width - image.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((10, image.height + 5 + 24 * i), line, fill='black', font=font)
    with atomic_write(out_path) as f:
        canvas.save(f, format='PNG')
    return canvas


def use_tutorial_files(model_path):
    """No checkpoint of ours, but the tutorial's pretrained model where its README put it?"""
    ours = os.path.isdir(model_path) and any(f.endswith('.pt') for f in os.listdir(model_path))
    return not ours and all(os.path.isfile(f) for f in TUTORIAL_FILES)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    paths = find_images(args.image)
    if not paths:
        fail('sample.py', f'no pictures in {" ".join(args.image)}: give picture files or folders holding '
                          f'{", ".join(IMAGE_EXTENSIONS[:3])} ... files')

    # Open every picture and check the output folder first: a bad one stops the run before a model is built
    for path in paths:
        try:
            open_rgb(path)
        except FileNotFoundError:
            fail('sample.py', f'{path} not found: give the path of a picture')
        except (UnidentifiedImageError, OSError, ValueError) as e:
            fail('sample.py', f'{path} is not a picture Pillow can read ({type(e).__name__}): give a JPEG or PNG file')
    if args.output:
        why = why_not_writable(args.output)
        if why:
            fail('sample.py', f'cannot write into --output {args.output} ({why}): pass a folder you can write to')
    for flag in ('gates', 'attention'):
        out = getattr(args, flag)
        why = out and why_not_writable(os.path.dirname(os.path.abspath(out)))
        if why:
            fail('sample.py', f'cannot write --{flag} {out} ({why}): pass a path in a folder you can write to')

    kw = dict(encoder_path=args.encoder_path, decoder_path=args.decoder_path, vocab_path=args.vocab_path)
    if args.checkpoint is None and not any(kw.values()) and use_tutorial_files(args.model_path):
        kw = dict(zip(kw, TUTORIAL_FILES))
    try:
        captioner = load_captioner(checkpoint=args.checkpoint, model_path=args.model_path,
                                   encoder_weights=args.encoder_weights, device=device, **kw)
    except (FileNotFoundError, ValueError, EncoderWeightsError) as e:
        fail('sample.py', e)
    print(f'model: {captioner.source}', file=sys.stderr)  # stderr: stdout holds only the captions
    if args.attention and not hasattr(captioner.decoder, 'attend'):
        fail('sample.py', f'--attention: {captioner.source} holds the tutorial\'s DecoderRNN, which has no attention: '
                          f'train a model with python train.py --decoder attention')

    tensors = [load_image(p, captioner.image_size, captioner.crop_size) for p in paths]
    captions = []
    for i in range(0, len(tensors), 32):  # batches of 32 pictures
        captions += caption_images(captioner, tensors[i:i + 32], device, args.beam_size,
                                   args.length_penalty, args.max_seq_length)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    for path, ids in zip(paths, captions):
        text = captioner.vocab.decode(ids)
        print(text if len(paths) == 1 else f'{path}: {text}')
        if args.output:
            out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + '_caption.png')
            try:
                canvas = draw_caption(path, text, out)
            except OSError as e:  # the disk filled up: the picture's temporary file is gone already
                fail('sample.py', f'cannot write {out} ({e.strerror or e}): free some space or pass another --output')
            if os.environ.get('DISPLAY') and sys.stdout.isatty():
                canvas.show()  # a desktop session: open it in the image viewer too
    if args.output:
        print(f'wrote {len(paths)} captioned picture(s) to {args.output}')
    if args.gates or args.attention:
        with torch.no_grad():
            features = captioner.encoder(tensors[0].to(device))  # (1, E), or (1, R, E) for attention
    if args.gates:
        import gates  # matplotlib, only when asked for
        os.makedirs(os.path.dirname(os.path.abspath(args.gates)), exist_ok=True)
        gates.plot_gates(captioner.decoder, features, captioner.vocab, args.gates,
                         max_seq_length=args.max_seq_length, expected_ids=captions[0])
        print(f'wrote the gates of {paths[0]} to {args.gates}')
    if args.attention:
        import attention_map  # matplotlib, only when asked for
        os.makedirs(os.path.dirname(os.path.abspath(args.attention)), exist_ok=True)
        attention_map.plot_attention(captioner.decoder, features, tensors[0], captioner.vocab, args.attention,
                                     max_seq_length=args.max_seq_length, expected_ids=captions[0])
        print(f'wrote the attention of {paths[0]} to {args.attention}')


if __name__ == '__main__':
    main()
