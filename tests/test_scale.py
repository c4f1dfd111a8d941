"""Long runs at COCO's size: what a log file shows, validation once per picture, the COCO-sized set."""
import json
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
            total += nn.CrossEntropyLoss(reduction='sum')(model(inputs, caps, lengths), targets).item()
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
