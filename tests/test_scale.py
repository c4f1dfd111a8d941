"""Long runs at COCO's size: what a log file shows, validation once per picture, the COCO-sized set."""
import os
import subprocess
import sys

from conftest import REPO, make_tiny_coco


def test_build_vocab_counts_words_without_importing_torch(tmp_path):
    # torch and torchvision take seconds and most of build_vocab.py's memory, to count words
    _, captions = make_tiny_coco(str(tmp_path))
    code = ('import sys, build_vocab\n'
            f'build_vocab.main(["--caption_path", {captions!r}, "--vocab_path", {str(tmp_path / "v.pkl")!r}])\n'
            'print(sorted(m for m in ("torch", "torchvision") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert 'Total vocabulary size' in out
    assert out.strip().splitlines()[-1] == '[]'


def test_resize_needs_no_torch():
    # each of its processes would carry torch's memory, to resize pictures with Pillow
    code = 'import sys, resize; print(sorted(m for m in ("torch", "torchvision") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


def test_validation_encodes_each_picture_once_and_gives_the_per_caption_loss(tmp_path):
    import torch
    import torch.nn as nn
    from torch.nn.utils.rnn import pack_padded_sequence
    from torch.utils.data import DataLoader

    import train
    from build_vocab import build_vocab
    from data_loader import collate_fn

    image_dir, captions = make_tiny_coco(str(tmp_path), n_images=7)  # 2 captions a picture
    vocab = build_vocab(captions, 1)
    args = train.get_args(['--encoder_weights', 'none', '--crop_size', '32', '--image_size', '48',
                           '--embed_size', '16', '--hidden_size', '24', '--batch_size', '3', '--num_workers', '0'])
    torch.manual_seed(0)
    encoder, decoder, _ = train.build_model(args, vocab, torch.device('cpu'), False)
    model = train.TrainModel(encoder, decoder)
    val_set = train.image_set(args, image_dir, captions, False, vocab)
    encoded = []
    encoder.resnet.register_forward_hook(lambda module, inputs, output: encoded.append(len(inputs[0])))

    # what validate() computed before: every caption with its own copy of the picture
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for inputs, caps, lengths in DataLoader(val_set, batch_size=3, collate_fn=collate_fn):
            targets = pack_padded_sequence(caps, lengths, batch_first=True).data
            total += nn.CrossEntropyLoss(reduction='sum')(model(inputs, caps, lengths)[0], targets).item()
            count += len(targets)
    assert sum(encoded) == 14
    encoded.clear()

    loader = DataLoader(train.PictureCaptions(val_set), batch_size=3, collate_fn=train.collate_pictures)
    loss, ppl = train.validate(model, loader, torch.device('cpu'), args)
    assert sum(encoded) == 7, 'the ResNet runs once per picture'
    assert abs(loss - total / count) < 1e-5 * abs(loss)
    assert model.training, 'validate() puts the model back in training mode'

    # a trial run's slice: the first pictures, with all their captions
    short = train.PictureCaptions(val_set, limit=2)
    assert (len(short), short.available) == (2, 7) and [len(c) for _, c in (short[0], short[1])] == [2, 2]


def run_logged(log, script, *args, env=None):
    """Run a script with stdout and stderr into a file, as `nohup python SCRIPT > log` does."""
    with open(log, 'w') as f:
        subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, stdout=f,
                       stderr=subprocess.STDOUT, env=env, check=True, timeout=600)
    with open(log) as f:
        return f.read()


def progress_lines(text, desc):
    return [line for line in text.splitlines() if line.startswith(f'{desc}: ')]


def test_every_long_stage_shows_progress_in_a_log_file(tmp_path):
    """The whole pipeline on a COCO-shaped set (bench/make_coco.py --quick), stdout into files."""
    root, env = tmp_path / 'coco', dict(os.environ, PROGRESS_INTERVAL_S='0')  # 0: a line every 5%
    subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'make_coco.py'), '--quick', '--root', root],
                   check=True, capture_output=True)
    ann = root / 'annotations'
    log = run_logged(tmp_path / 'vocab.log', 'build_vocab.py', '--caption_path', ann / 'captions_train2014.json',
                     '--vocab_path', tmp_path / 'vocab.pkl', '--threshold', 1, env=env)
    assert len(progress_lines(log, 'tokenizing captions')) > 5
    for split in ('train', 'val'):
        log = run_logged(tmp_path / f'resize_{split}.log', 'resize.py', '--image_dir', root / f'{split}2014',
                         '--output_dir', root / f'resized_{split}', '--image_size', 40, env=env)
        lines = progress_lines(log, 'resizing')
        assert len(lines) > 5 and '%' in lines[0] and 'left' in lines[0] and 'in all' in lines[-1]

    models = tmp_path / 'models'
    log = run_logged(tmp_path / 'train.log', 'train.py', '--encoder_weights', 'none', '--crop_size', 32,
                     '--image_size', 40, '--image_dir', root / 'resized_train', '--caption_path',
                     ann / 'captions_train2014.json', '--val_image_dir', root / 'resized_val', '--val_caption_path',
                     ann / 'captions_val2014.json', '--vocab_path', tmp_path / 'vocab.pkl', '--model_path', models,
                     '--batch_size', 16, '--max_steps', 3, '--feature_cache', 'on', '--cache_views', 2,
                     '--select_by', 'bleu4', '--select_subset', 10, '--recalibrate_bn', 2, env=env)
    for desc in ('feature cache', 'encoding captions', 'recalibrating bn', 'validating',
                 'captioning for --select_by bleu4'):
        assert progress_lines(log, desc), f'no {desc!r} lines in\n{log}'
    assert len(progress_lines(log, 'encoding captions')) > 5
    # 3 steps of 16 captions: validated on about as many captions, 5 a picture, of the 20 val pictures
    assert 'validating on the first 9 of 20 validation pictures (a trial run' in log
    assert progress_lines(log, 'validating')[-1].startswith('validating: 9/9 pictures')
    assert 'metrics: BLEU on 10 images: ' in log

    log = run_logged(tmp_path / 'evaluate.log', 'evaluate.py', '--checkpoint', models / 'best.pt', '--image_dir',
                     root / 'resized_val', '--caption_path', ann / 'captions_val2014.json', '--batch_size', 4,
                     env=env)
    assert len(progress_lines(log, 'captioning')) > 3
    for scorer in ('BLEU', 'METEOR', 'ROUGE_L', 'CIDEr'):
        assert f'metrics: {scorer} on 20 images...' in log and f'metrics: {scorer} on 20 images: ' in log
