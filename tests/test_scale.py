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
