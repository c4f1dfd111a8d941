"""evaluate.py: COCO results file, the metrics table, Karpathy splits, one-line errors."""
import functools
import json
import os
import re

import pytest
import torch

import evaluate
import metrics
from conftest import run, train_args
from model import DecoderRNN
from vocab import Vocabulary

METRIC_LINE = r'^{}\s+\d+\.\d\d$'


@pytest.fixture(scope='module')
def tiny_model(tiny_coco, tiny_vocab, tmp_path_factory):
    """A model folder with one checkpoint of train.py (one step: the captions are poor,
    which is all these tests need)."""
    model_path = tmp_path_factory.mktemp('models')
    run('train.py', *train_args(tiny_coco, tiny_vocab, model_path, '--dry_run'))
    return str(model_path)


def references(caption_path):
    with open(caption_path) as f:
        coco = json.load(f)
    refs = {}
    for ann in coco['annotations']:
        refs.setdefault(ann['image_id'], []).append(ann['caption'])
    return refs


def eval_args(tiny_coco, model_path, *extra):
    image_dir, caption_path = tiny_coco
    args = ['--image_dir', image_dir, '--caption_path', caption_path, '--model_path', model_path,
            '--num_workers', 0, '--batch_size', 5, '--device', 'cpu', *extra]
    return [str(a) for a in args]


def test_cli_writes_coco_results_and_prints_the_table(tiny_coco, tiny_model):
    out = run('evaluate.py', *eval_args(tiny_coco, tiny_model, '--num_workers', 1)).stdout
    assert out.startswith('{'), 'prints its arguments first'
    # the default results path: beside the model, named after the caption file
    with open(os.path.join(tiny_model, 'captions_train2014_results.json')) as f:
        results = json.load(f)
    assert [r['image_id'] for r in results] == sorted(references(tiny_coco[1])), 'every image once, by id'
    for r in results:
        assert set(r) == {'image_id', 'caption'}
        assert type(r['image_id']) is int and isinstance(r['caption'], str)
        assert '<start>' not in r['caption'] and '<end>' not in r['caption'] and '<pad>' not in r['caption']
    assert '0-100 scale' in out
    for name in ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L', 'CIDEr-D'):
        assert re.search(METRIC_LINE.format(name), out, re.M), name
    assert re.search(METRIC_LINE.format('METEOR'), out, re.M) or re.search(r'^METEOR\s+skipped', out, re.M)


def test_scores_are_high_when_the_captions_are_references(tiny_coco, tiny_model, tmp_path, monkeypatch, capsys):
    """The scoring path end to end (results file, references, metrics, table) without the model:
    captions equal to one of each image's references score (near) 100; wrong ones score low."""
    refs = references(tiny_coco[1])
    monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)  # as on a machine without Java
    fake = {}
    monkeypatch.setattr(evaluate, 'caption_images', lambda *args, **kw: dict(fake))

    fake.update({i: r[0] for i, r in refs.items()})
    scores = evaluate.main(eval_args(tiny_coco, tiny_model, '--results_path', tmp_path / 'good.json'))
    out = capsys.readouterr().out
    for name in ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L'):
        assert scores[name] == pytest.approx(100.0, abs=1e-6), name
    assert scores['CIDEr-D'] > 100.0  # not bounded by 100: 10 x a cosine similarity, minus a length penalty
    assert 'METEOR' not in scores and re.search(r'^METEOR\s+skipped: java not found', out, re.M)
    with open(tmp_path / 'good.json') as f:
        assert {r['image_id']: r['caption'] for r in json.load(f)} == fake

    fake.update({i: 'a zebra eating grass' for i in refs})
    scores = evaluate.main(eval_args(tiny_coco, tiny_model, '--results_path', tmp_path / 'bad.json'))
    assert scores['BLEU-4'] < 1.0 and scores['CIDEr-D'] < 5.0


def test_karpathy_split_selects_its_images_by_cocoid(tiny_coco, tiny_model, tmp_path, monkeypatch, capsys):
    ids = sorted(references(tiny_coco[1]))
    split = {'dataset': 'coco', 'images': [
        {'cocoid': i, 'split': 'test' if n < 4 else 'val' if n < 7 else 'train', 'filepath': 'val2014',
         'filename': f'COCO_val2014_{i:012d}.jpg', 'sentences': []} for n, i in enumerate(ids)]}
    split['images'].append({'cocoid': 99999, 'split': 'val', 'filepath': 'val2014', 'filename': 'x.jpg'})
    split_file = tmp_path / 'dataset_coco.json'
    split_file.write_text(json.dumps(split))
    # no METEOR: this test is about which images are captioned
    monkeypatch.setattr(evaluate, 'score_captions', functools.partial(metrics.score_captions, metrics=('BLEU',)))

    evaluate.main(eval_args(tiny_coco, tiny_model, '--split_file', split_file))  # --split test by default
    with open(os.path.join(tiny_model, 'captions_test_results.json')) as f:
        assert [r['image_id'] for r in json.load(f)] == ids[:4]

    results_path = tmp_path / 'val.json'
    evaluate.main(eval_args(tiny_coco, tiny_model, '--split_file', split_file, '--split', 'val',
                            '--results_path', results_path, '--beam_size', 1, '--max_images', 2))
    err = capsys.readouterr().err
    assert "note: 1 of the 4 'val' images are not in" in err
    with open(results_path) as f:
        assert [r['image_id'] for r in json.load(f)] == ids[4:6]


def one_line_error(proc_or_err):
    lines = proc_or_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('evaluate.py: error: '), proc_or_err
    return lines[0]


def test_bad_input_one_line_exit_2_nothing_written(tiny_coco, tiny_model, tmp_path, capsys):
    image_dir, caption_path = tiny_coco
    results = tmp_path / 'out' / 'results.json'
    # through the command line: the exit code and stderr a user sees
    proc = run('evaluate.py', *eval_args(tiny_coco, tmp_path / 'no_models', '--results_path', results), check=False)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert str(tmp_path / 'no_models') in line and 'train a model first (python train.py)' in line, line
    proc = run('evaluate.py', *eval_args(tiny_coco, tiny_model, '--caption_path', tmp_path / 'nope.json',
                                         '--results_path', results), check=False)
    assert proc.returncode == 2 and 'caption file' in one_line_error(proc.stderr)

    # images missing from the folder, a folder that is not there, a split file that is not there,
    # a caption file that is not COCO's, a split with no images in the caption file
    partial = tmp_path / 'partial'
    partial.mkdir()
    os.symlink(os.path.join(image_dir, 'img_000.png'), partial / 'img_000.png')
    not_coco = tmp_path / 'not_coco.json'
    not_coco.write_text('[1, 2, 3]')
    other_split = tmp_path / 'split.json'
    other_split.write_text(json.dumps({'images': [{'cocoid': 5, 'split': 'test'}]}))
    cases = [(['--image_dir', partial], '11 of the 12 images are not in'),
             (['--image_dir', tmp_path / 'nowhere'], 'image folder'),
             (['--split_file', tmp_path / 'dataset_coco.json'], 'caption_datasets.zip'),
             (['--caption_path', not_coco], 'is not a COCO caption file'),
             (['--split_file', other_split], "none of the 1 'test' images")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(eval_args(tiny_coco, tiny_model, '--results_path', results, *extra))
        assert e.value.code == 2
        assert message in one_line_error(capsys.readouterr().err), extra
    assert not (tmp_path / 'out').exists(), 'nothing written'
    with pytest.raises(SystemExit) as e:
        evaluate.main(eval_args(tiny_coco, tiny_model, '--beam_size', 0))
    assert e.value.code == 2 and '--beam_size must be at least 1' in capsys.readouterr().err


def test_generate_and_decode_are_greedy_sample_as_text():
    torch.manual_seed(0)
    vocab = Vocabulary.from_words(['<pad>', '<start>', '<end>', '<unk>', 'a', 'dog', 'runs', '.'])
    decoder = DecoderRNN(6, 8, len(vocab), 1, max_seq_length=6).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            torch.nn.init.normal_(p, std=2.0)
    features = torch.randn(10, 6)
    captions = [vocab.decode(ids, markers=False) for ids in decoder.generate(features)]
    assert captions == [vocab.decode(ids, markers=False) for ids in decoder.sample(features).tolist()]
    assert all(isinstance(c, str) and '<start>' not in c and '<end>' not in c for c in captions)
    assert vocab.decode([1, 4, 5, 3, 2, 6], markers=False) == 'a dog <unk>', 'cut at <end>, <unk> kept'
    assert len(decoder.generate(features, beam_size=3, max_seq_length=3)) == 10
