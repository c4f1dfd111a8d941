"""demo.py: the whole job on the built-in set, at a test's size."""
import os
import re

import pytest

import demo
import feature_cache
from conftest import run


def test_demo_runs_every_step(tmp_path):
    out = run('demo.py', '--data_dir', tmp_path / 'data', '--model_path', tmp_path / 'models',
              '--output', tmp_path / 'shown', '--num_train', 40, '--num_val', 8, '--image_size', 48,
              '--crop_size', 32, '--embed_size', 16, '--hidden_size', 32, '--num_epochs', 2, '--batch_size', 16,
              '--num_workers', 0, '--examples', 3, '--encoder_weights', 'none').stdout
    for step in range(1, 7):
        assert f'=== {step}/6 ' in out
    assert re.search(r'^Epoch \[1/2\], Step \[0/\d+\], Loss: ', out, re.M), 'train.py ran'
    assert 'BLEU-4' in out and 'CIDEr-D' in out, 'evaluate.py printed its table'
    assert out.count('    model:     ') == 3 and out.count('    reference: ') == 3
    assert re.search(r'BLEU-4 \(0-100\) of the captions: \d+\.\d; of the same model fed the wrong pictures: \d+\.\d',
                     out)
    assert len(os.listdir(tmp_path / 'shown')) == 3
    assert os.path.isfile(tmp_path / 'models' / 'best.pt')
    # the time of each stage, the ResNet's pass over the pictures within train.py's
    table = out[out.rindex('\nstage '):]
    rows = dict(re.findall(r'^ *(\S.*?) +(\d+\.\d)$', table, re.M))
    for stage in ('1 make_shapes.py', '2 build_vocab.py', '3 resize.py', '4 train.py', '5 evaluate.py', 'total'):
        assert stage in rows, table
    precision = 'bf16' if feature_cache.native_bf16('cpu') else 'float32'
    resnet = rows[f'feature cache (ResNet, {precision})']
    assert 0 < float(resnet) <= float(rows['4 train.py']), 'the cache was built in this run, inside train.py'
    assert abs(sum(float(rows[s]) for s in rows if s[0].isdigit()) - float(rows['total'])) < 0.5
    # train.py's caches were found again, not rebuilt, for the held-out captions
    assert out.count('feature cache: no cache for this') == 2 and 'will not run' in out


@pytest.mark.parametrize('flags, device, amp', [
    ({'avx512f', 'amx_bf16', 'amx_tile'}, 'cpu', 'bf16'),  # Sapphire Rapids and later
    ({'avx512f', 'avx512_bf16'}, 'cpu', 'bf16'),                      # Cooper Lake, Zen 4
    ({'avx2', 'avx512f'}, 'cpu', 'off'),                              # bf16 only emulated: slower
    (set(), 'cpu', 'off'),                                            # not Linux, or no flags line
])
def test_auto_precision_follows_the_cpu(monkeypatch, flags, device, amp):
    monkeypatch.setattr(feature_cache, 'cpu_flags', lambda: flags)
    assert demo.choose_amp('auto', device) == amp
    assert demo.choose_amp('off', device) == 'off' and demo.choose_amp('bf16', device) == 'bf16'


def test_stage_table():
    stages = demo.Stages()
    with stages('1 first'):
        pass
    with stages('2 second'):
        pass
    stages.rows = [('1 first', 2.0), ('2 second', 10.0)]  # fixed times, so the sums are known
    stages.part('2 second', 'a part', 4.0, rest='the others')
    lines = stages.table().splitlines()
    assert [line.split()[-1] for line in lines[1:]] == ['2.0', '10.0', '4.0', '6.0', '12.0']
    assert lines[3].strip().startswith('a part') and lines[4].strip().startswith('the others')
