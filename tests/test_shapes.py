"""make_shapes.py: deterministic, COCO-shaped, and loadable by pycocotools (seconds, CPU)."""
import os
import subprocess
import sys

import pytest
from PIL import Image
from pycocotools.coco import COCO

import make_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(out, seed=0, num_train=6, num_val=3, size=48):
    make_shapes.main(['--output_dir', str(out), '--num_train', str(num_train), '--num_val', str(num_val),
                      '--image_size', str(size), '--seed', str(seed)])


def read_tree(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_same_seed_same_bytes_other_seed_other_files(tmp_path):
    generate(tmp_path / 'a', seed=0)
    generate(tmp_path / 'b', seed=0)
    generate(tmp_path / 'c', seed=1)
    a, b, c = (read_tree(tmp_path / d) for d in 'abc')
    assert sorted(a) == sorted(b), 'same seed: different file names'
    assert [p for p in a if a[p] != b[p]] == [], 'same seed: files differ'
    assert not any(p.endswith('.tmp') or '.tmp' in p for p in a), 'temporary files left behind'
    assert sorted(a) == sorted(c), 'the layout must not depend on the seed'
    assert all(a[p] != c[p] for p in a), 'another seed must give other pictures and captions'


def test_picture_i_does_not_depend_on_split_size(tmp_path):
    generate(tmp_path / 'small', num_train=2)
    generate(tmp_path / 'big', num_train=5)
    for name in ('shapes_train_000001.png', 'shapes_train_000002.png'):
        small = (tmp_path / 'small' / 'images' / 'train' / name).read_bytes()
        assert small == (tmp_path / 'big' / 'images' / 'train' / name).read_bytes(), name


def test_coco_layout(tmp_path):
    generate(tmp_path, size=40)
    ids, names = {}, {}
    for split in ('train', 'val'):
        coco = COCO(str(tmp_path / 'annotations' / f'captions_{split}.json'))
        assert set(coco.dataset) >= {'info', 'licenses', 'images', 'annotations'}
        assert len(coco.imgs) == {'train': 6, 'val': 3}[split]
        for image_id, image in coco.imgs.items():
            # file_name is relative to the split's image folder, as in COCO
            path = tmp_path / 'images' / split / image['file_name']
            with Image.open(path) as picture:
                assert picture.size == (image['width'], image['height']) == (40, 40)
                assert picture.mode == 'RGB'
            captions = [ann['caption'] for ann in coco.imgToAnns[image_id]]
            assert len(captions) >= 3 and len(set(captions)) == len(captions), captions
            for caption in captions:
                words = caption.split()
                assert 3 <= len(words) <= 12 and caption == caption.lower(), caption
                assert str(image['scene']['colour']) in words, (caption, image['scene'])
        ids[split] = set(coco.imgs)
        names[split] = {image['file_name'] for image in coco.imgs.values()}
        ann_ids = set(coco.anns)
        assert len(ann_ids) == len(coco.dataset['annotations']), 'annotation ids must be unique'
        ids[split + '_ann'] = ann_ids
    assert not ids['train'] & ids['val'] and not ids['train_ann'] & ids['val_ann']
    assert not names['train'] & names['val']
    assert sorted(os.listdir(tmp_path / 'annotations')) == ['captions_train.json', 'captions_val.json']


def test_scenes_cover_every_attribute_and_fit():
    """Every combination of count, size and position can be placed inside the margins."""
    import random
    rng = random.Random(0)
    for count in make_shapes.COUNTS:
        for size in make_shapes.SIZES:
            for position in make_shapes.POSITIONS:
                scene = {'background': 'blue', 'colour': 'red', 'shape': 'triangle',
                         'count': count, 'size': size, 'position': position}
                objects = make_shapes.place_objects(scene, rng)
                assert len(objects) == count
                for cx, cy, r in objects:
                    reach = make_shapes.EXTENT * r
                    assert make_shapes.MARGIN <= min(cx, cy) - reach and max(cx, cy) + reach <= 1 - make_shapes.MARGIN


@pytest.mark.parametrize('flags, message', [
    (['--num_train', '0'], '--num_train'),
    (['--image_size', '8'], '--image_size'),
    (['--captions_per_image', '9'], '--captions_per_image'),
])
def test_bad_input_one_line_exit_2(tmp_path, flags, message):
    result = subprocess.run([sys.executable, 'make_shapes.py', '--output_dir', str(tmp_path / 'out')] + flags,
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists(), 'nothing may be written on bad input'


def test_a_killed_runs_temporaries_are_removed(tmp_path):
    generate(tmp_path, num_train=2, num_val=1)
    image_dir = tmp_path / 'images' / 'train'
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    stale = image_dir / f'.shapes_train_000001.png.{int(dead.stdout)}.tmp'  # its writer is gone
    stale.write_bytes(b'\x89PNG half a picture')
    generate(tmp_path, num_train=2, num_val=1)
    assert not stale.exists()
    assert not [p for p in read_tree(tmp_path) if '.tmp' in p]
