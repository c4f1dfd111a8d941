"""demo.py: the whole job on the built-in set, at a test's size."""
import os
import re

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
