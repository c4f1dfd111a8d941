"""The lab's pipeline through its command lines: build_vocab -> resize -> train -> sample."""
import json
import os
import re

from PIL import Image

from conftest import TINY_MODEL, make_tiny_coco, run
from vocab import load_vocab, tokenize


def test_scripts_end_to_end(tmp_path):
    image_dir, caption_path = make_tiny_coco(str(tmp_path / 'coco'))
    vocab_path, resized, models = tmp_path / 'vocab.pkl', tmp_path / 'resized', tmp_path / 'models'
    out = run('build_vocab.py', '--caption_path', caption_path, '--vocab_path', vocab_path, '--threshold', 2).stdout
    assert 'Total vocabulary size:' in out and os.path.isfile(vocab_path)
    run('resize.py', '--image_dir', image_dir, '--output_dir', resized, '--image_size', 40)
    assert sorted(os.listdir(resized)) == sorted(os.listdir(image_dir))
    assert Image.open(resized / 'img_000.png').size == (40, 40)
    out = run('train.py', '--image_dir', resized, '--caption_path', caption_path, '--vocab_path', vocab_path,
              '--model_path', models, '--val_caption_path', tmp_path / 'none.json', *TINY_MODEL,
              '--image_size', 40, '--num_epochs', 2, '--batch_size', 4).stdout
    assert re.search(r'^Epoch \[1/2\], Step \[0/\d+\], Loss: \d+\.\d{4}, Perplexity: \d+\.\d{4}$', out, re.M)
    # no path flags: sample.py takes the newest checkpoint in --model_path
    picture = os.path.join(image_dir, 'img_001.png')
    line = run('sample.py', '--image', picture, '--model_path', models, '--output', tmp_path / 'shown').stdout
    caption = line.splitlines()[0]
    words, vocab = caption.split(), load_vocab(vocab_path)
    # a model trained for 2 epochs says little, but in the lab's format: vocabulary words,
    # cut after the first <end>, at most max_seq_length (20) of them
    assert all(w in vocab.word2idx for w in words) and 0 < len(words) <= 20, caption
    assert '<end>' not in words[:-1], caption
    assert Image.open(tmp_path / 'shown' / 'img_001_caption.png').height > Image.open(picture).height


def test_memorises_a_few_dozen_pairs(tmp_path):
    """The lab's sanity check: on 24 picture-caption pairs the training loss drops below 0.5
    and greedy decoding gives back the captions it was trained on."""
    image_dir, caption_path = make_tiny_coco(str(tmp_path / 'coco'), n_images=24, captions_per_image=1)
    vocab_path, models = tmp_path / 'vocab.pkl', tmp_path / 'models'
    run('build_vocab.py', '--caption_path', caption_path, '--vocab_path', vocab_path, '--threshold', 1)
    # validate on the training pictures themselves: memorising them is the point here
    out = run('train.py', '--image_dir', image_dir, '--caption_path', caption_path, '--vocab_path', vocab_path,
              '--model_path', models, '--val_caption_path', caption_path, '--val_image_dir', image_dir,
              *TINY_MODEL, '--embed_size', 32, '--hidden_size', 128, '--batch_size', 8, '--learning_rate', 0.005,
              '--num_epochs', 1000, '--max_steps', 900, '--log_step', 50, '--augment', 'none',
              '--recalibrate_bn', 3, '--feature_cache_dir', tmp_path / 'features').stdout
    losses = [float(x) for x in re.findall(r'^Epoch .*, Loss: (\d+\.\d+), Perplexity', out, re.M)]
    assert losses[-1] < 0.5 and losses[-1] < losses[0] / 10
    printed = run('sample.py', '--image', image_dir, '--model_path', models).stdout.splitlines()
    with open(caption_path) as f:
        data = json.load(f)
    names = {im['id']: im['file_name'] for im in data['images']}
    wanted = {names[a['image_id']]: '<start> ' + ' '.join(tokenize(a['caption'])) + ' <end>'
              for a in data['annotations']}
    got = dict(line.split(': ', 1) for line in printed)
    right = [name for name in wanted if got[os.path.join(image_dir, name)] == wanted[name]]
    assert len(right) >= 22, f'{len(right)}/24 captions reproduced:\n' + '\n'.join(printed)
