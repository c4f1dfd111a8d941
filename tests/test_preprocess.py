"""Preprocessing: vocab.py, build_vocab.py and resize.py, through main([...]) and their command lines."""
import builtins
import json
import os
import pickle
import subprocess
import sys

import nltk
import pytest
from PIL import Image

import build_vocab
import resize
from conftest import REPO, TUTORIAL_VOCABULARY, run
from data_loader import existing_images, load_coco
from vocab import SPECIAL_TOKENS, Vocabulary, load_vocab, save_vocab, tokenize

# counts with threshold 2: a 5, '.' 4, dog 3, cat 2, sleeps 2; runs, and, the, '!', bird 1
CAPTIONS = ['A dog runs.', 'A dog sleeps.', 'A dog and a cat.', 'The cat sleeps!', 'A bird.']


def assert_one_line_error(proc, *words):
    """Bad input: exit code 2 and one line on stderr that names the problem, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


# ---------------------------------------------------------------------------
# vocab.py


def test_tokenize_needs_no_nltk_data(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, 'path', [str(tmp_path)])  # nowhere to find punkt
    with pytest.raises(LookupError):
        nltk.data.find('tokenizers/punkt')
    assert tokenize('A man, riding a "big" horse.') == ['a', 'man', ',', 'riding', 'a', '``', 'big', "''", 'horse', '.']
    assert tokenize(42) == ['42']


def test_vocabulary():
    vocab = Vocabulary.from_words(['a', 'dog'])
    assert vocab.words() == [*SPECIAL_TOKENS, 'a', 'dog']
    assert [vocab(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert vocab('dog') == 5 and vocab('unseen') == 3 and len(vocab) == 6 and vocab.idx == 6
    assert vocab.idx2word[5] == 'dog'
    assert Vocabulary.from_words(vocab.words()).word2idx == vocab.word2idx  # a checkpoint's round trip
    with pytest.raises(ValueError, match='different words'):
        Vocabulary.from_words(['a', 'dog', 'a'])
    with pytest.raises(TypeError, match='str'):
        Vocabulary.from_words(['a', 7])
    # tutorial threshold (count >= threshold); most frequent first, ties alphabetical
    vocab = Vocabulary.build({'b': 2, 'a': 2, 'c': 9, 'rare': 1}, threshold=2)
    assert vocab.words() == [*SPECIAL_TOKENS, 'c', 'a', 'b']


def test_save_and_load(tmp_path):
    path = tmp_path / 'new' / 'vocab.pkl'  # save_vocab makes the folder
    save_vocab(Vocabulary.from_words(['dog']), path)
    assert load_vocab(path).words() == [*SPECIAL_TOKENS, 'dog']
    assert os.listdir(path.parent) == ['vocab.pkl'], 'no temporary file left behind'
    with pytest.raises(FileNotFoundError, match='python build_vocab.py'):
        load_vocab(tmp_path / 'missing.pkl')


def make_tutorial_pickles(folder):
    """Run the tutorial's class as __main__ (as its build_vocab.py did) and pickle a vocabulary
    with the default protocol, protocols 0 and 2, and from a module named build_vocab."""
    script = TUTORIAL_VOCABULARY + '''
import pickle, sys, types
vocab = Vocabulary()
for word in ['<pad>', '<start>', '<end>', '<unk>', 'a', 'giraffe']:
    vocab.add_word(word)
for protocol in (None, 0, 2):
    with open(f'vocab_{protocol}.pkl', 'wb') as f:
        pickle.dump(vocab, f, protocol=protocol)
sys.modules['build_vocab'] = types.ModuleType('build_vocab')  # as if imported from build_vocab.py
sys.modules['build_vocab'].Vocabulary = Vocabulary
Vocabulary.__module__ = 'build_vocab'
with open('vocab_module.pkl', 'wb') as f:
    pickle.dump(vocab, f)
'''
    subprocess.run([sys.executable, '-c', script], cwd=folder, check=True)
    return [os.path.join(folder, f'vocab_{kind}.pkl') for kind in ('None', 0, 2, 'module')]


def test_tutorial_pickles_load_anywhere(tmp_path):
    paths = make_tutorial_pickles(tmp_path)
    with open(paths[0], 'rb') as f, pytest.raises(AttributeError, match='Vocabulary'):
        pickle.load(f)  # the tutorial's problem: __main__ here has no Vocabulary
    for path in paths:
        vocab = load_vocab(path)
        assert type(vocab) is Vocabulary and vocab.words() == [*SPECIAL_TOKENS, 'a', 'giraffe'], path
        assert vocab('giraffe') == 5 and vocab('zebra') == 3
    # and from another script in another working directory
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    code = (f'import sys; sys.path.insert(0, {REPO!r}); from vocab import load_vocab; '
            f'print(len(load_vocab({paths[1]!r})))')
    out = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '6'


class Exploit:
    """Unpickling this runs a shell command: what a crafted vocab.pkl could do to pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickles_that_are_not_vocabularies_are_refused(tmp_path):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'vocab.pkl'
    bad.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(ValueError, match=r'vocab\.pkl.*system'):
        load_vocab(bad)
    assert not marker.exists(), 'the command must not run'

    # a plain object inside an otherwise fine vocabulary is refused the same way
    vocab = Vocabulary.from_words(['dog'])
    vocab.extra = Exploit(marker)
    bad.write_bytes(pickle.dumps(vocab))
    with pytest.raises(ValueError, match='system'):
        load_vocab(bad)
    assert not marker.exists()

    for thing, problem in [({'word2idx': {}}, 'expected a Vocabulary'),
                           (Vocabulary(), 'ids 0-3'),  # no special tokens
                           ]:
        bad.write_bytes(pickle.dumps(thing))
        with pytest.raises(ValueError, match=problem):
            load_vocab(bad)
    broken = Vocabulary.from_words(['dog'])
    broken.idx2word[4] = 'cat'  # idx2word no longer matches word2idx
    bad.write_bytes(pickle.dumps(broken))
    with pytest.raises(ValueError, match='inverse'):
        load_vocab(bad)
    bad.write_bytes(b'not a pickle at all')
    with pytest.raises(ValueError, match='not a vocabulary'):
        load_vocab(bad)


# ---------------------------------------------------------------------------
# build_vocab.py


@pytest.fixture
def caption_file(tmp_path):
    images = [{'id': i, 'file_name': f'{i}.jpg', 'width': 8, 'height': 8} for i in range(len(CAPTIONS))]
    anns = [{'id': 10 + i, 'image_id': i, 'caption': text} for i, text in enumerate(CAPTIONS)]
    path = tmp_path / 'captions_train2014.json'
    path.write_text(json.dumps({'images': images, 'annotations': anns}))
    return path


def test_build_vocab_command_line(caption_file, tmp_path):
    path = tmp_path / 'vocab.pkl'
    out = run('build_vocab.py', '--caption_path', caption_file, '--vocab_path', path, '--threshold', 2).stdout
    assert out.startswith('{') and "'threshold': 2" in out, 'prints its arguments first'
    assert 'Total vocabulary size: 9\n' in out and f"Saved the vocabulary wrapper to '{path}'" in out
    assert load_vocab(path).words() == [*SPECIAL_TOKENS, 'a', '.', 'dog', 'cat', 'sleeps']


def test_build_vocab_main(caption_file, tmp_path, capsys):
    path = tmp_path / 'vocab.pkl'
    build_vocab.main(['--caption_path', str(caption_file), '--vocab_path', str(path), '--threshold', '1'])
    assert 'Total vocabulary size: 14' in capsys.readouterr().out
    first = path.read_bytes()
    build_vocab.main(['--caption_path', str(caption_file), '--vocab_path', str(path), '--threshold', '1'])
    assert path.read_bytes() == first, 'the same captions give the same file'
    assert build_vocab.build_vocab(str(caption_file), 1).words() == load_vocab(path).words()


def test_build_vocab_bad_input(caption_file, tmp_path):
    missing = tmp_path / 'nope.json'
    proc = run('build_vocab.py', '--caption_path', missing, check=False)
    assert_one_line_error(proc, str(missing), 'annotations_trainval2014.zip')
    (tmp_path / 'instances.json').write_text(json.dumps({'images': [], 'annotations': [{'id': 1, 'image_id': 1}]}))
    proc = run('build_vocab.py', '--caption_path', tmp_path / 'instances.json', '--vocab_path', tmp_path / 'v.pkl',
               check=False)
    assert_one_line_error(proc, 'caption')
    with pytest.raises(SystemExit) as e:
        build_vocab.main(['--caption_path', str(caption_file), '--threshold', '0'])
    assert e.value.code == 2
    assert not (tmp_path / 'v.pkl').exists()


# ---------------------------------------------------------------------------
# resize.py


def make_images(folder):
    """One image of each awkward kind, and two files that are not images. Returns the good names."""
    folder.mkdir()
    Image.new('RGB', (64, 48), (200, 10, 10)).save(folder / 'rgb.jpg')
    Image.new('L', (30, 60), 128).save(folder / 'gray.jpg')
    Image.new('I;16', (20, 20), 30000).save(folder / 'gray16.png')  # 16-bit: 30000/65535 -> 117
    # palette: left half blue, right half index 0, which is transparent -> white
    palette = Image.new('P', (40, 40), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))
    palette.save(folder / 'palette.png', transparency=0)
    Image.new('LA', (40, 40), (0, 0)).save(folder / 'clear.png')  # fully transparent -> white
    Image.new('CMYK', (50, 50), (0, 255, 255, 0)).save(folder / 'cmyk.jpg')  # red ink
    # stored 60 x 40 with a red top-left corner; EXIF orientation 6: shown turned 90 degrees clockwise
    sideways = Image.new('RGB', (60, 40), 'blue')
    sideways.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / 'sideways.jpg', exif=exif)
    (folder / 'broken.jpg').write_bytes((folder / 'rgb.jpg').read_bytes()[:200])
    (folder / 'notes.txt').write_text('not an image')
    return ['clear.png', 'cmyk.jpg', 'gray.jpg', 'gray16.png', 'palette.png', 'rgb.jpg', 'sideways.jpg']


def near(pixel, colour, tolerance=8):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def test_resize_command_line(tmp_path):
    good = make_images(tmp_path / 'in')
    out_dir = tmp_path / 'out'
    proc = run('resize.py', '--image_dir', tmp_path / 'in', '--output_dir', out_dir, '--image_size', 32,
               '--num_workers', 2)
    assert proc.stdout.startswith('{')
    assert 'Resized 7 images, skipped 0 (already done), 2 not images/corrupt: broken.jpg, notes.txt' in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if 'warning:' in line]
    assert len(warnings) == 2 and 'broken.jpg' in warnings[0] and 'notes.txt' in warnings[1]
    assert 'Traceback' not in proc.stderr
    assert sorted(os.listdir(out_dir)) == good, 'same names, no temporary files, nothing for bad files'

    images = {name: Image.open(out_dir / name) for name in good}
    for name, image in images.items():
        assert image.size == (32, 32) and image.mode == 'RGB', name
        assert image.format == ('JPEG' if name.endswith('.jpg') else 'PNG'), name
    assert near(images['gray.jpg'].getpixel((5, 5)), (128, 128, 128))
    assert near(images['gray16.png'].getpixel((5, 5)), (117, 117, 117))
    assert near(images['palette.png'].getpixel((2, 16)), (0, 0, 255))
    assert near(images['palette.png'].getpixel((30, 16)), (255, 255, 255))
    assert near(images['clear.png'].getpixel((16, 16)), (255, 255, 255))
    assert near(images['cmyk.jpg'].getpixel((16, 16)), (255, 0, 0), tolerance=12)
    # upright, the red corner is at the top right
    assert near(images['sideways.jpg'].getpixel((30, 2)), (255, 0, 0), tolerance=40)
    assert near(images['sideways.jpg'].getpixel((2, 2)), (0, 0, 255), tolerance=40)


def test_resize_rerun_redoes_only_what_is_missing(tmp_path, capsys):
    make_images(tmp_path / 'in')
    def args(size):
        return ['--image_dir', str(tmp_path / 'in'), '--output_dir', str(tmp_path / 'out'), '--image_size', str(size),
                '--num_workers', '0']

    resize.main(args(24))
    assert 'Resized 7 images' in capsys.readouterr().out
    done = {n: os.stat(tmp_path / 'out' / n).st_mtime_ns for n in os.listdir(tmp_path / 'out')}
    resize.main(args(24))
    assert 'Resized 0 images, skipped 7 (already done), 2 not images/corrupt' in capsys.readouterr().out
    assert {n: os.stat(tmp_path / 'out' / n).st_mtime_ns for n in done} == done, 'nothing rewritten'

    # as after a crash: one output missing, one cut short (by another tool), a temporary file left over
    os.remove(tmp_path / 'out' / 'rgb.jpg')
    cut = tmp_path / 'out' / 'sideways.jpg'
    cut.write_bytes(cut.read_bytes()[:300])
    (tmp_path / 'out' / '.rgb.jpg.12345.tmp').write_bytes(b'half an image')
    resize.main(args(24))
    assert 'Resized 2 images, skipped 5 (already done)' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / 'out')) == sorted(done), 'the temporary file is gone'
    assert Image.open(cut).size == (24, 24)
    # a different --image_size redoes everything
    resize.main(args(16))
    assert 'Resized 7 images, skipped 0' in capsys.readouterr().out


def test_resize_reads_a_read_only_folder(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / 'in')
    in_dir = str(tmp_path / 'in')
    before = {n: (tmp_path / 'in' / n).read_bytes() for n in os.listdir(in_dir)}
    # chmod does not stop root, so also fail every open for writing inside the folder
    real_open = builtins.open

    def guarded_open(file, mode='r', *args, **kwargs):
        if set(mode) & set('wax+') and os.path.abspath(str(file)).startswith(in_dir + os.sep):
            raise PermissionError(f'read-only: {file}')
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', guarded_open)
    for name in os.listdir(in_dir):
        os.chmod(os.path.join(in_dir, name), 0o444)
    os.chmod(in_dir, 0o555)
    try:
        resize.main(['--image_dir', in_dir, '--output_dir', str(tmp_path / 'out'), '--image_size', '16',
                     '--num_workers', '0'])
    finally:
        os.chmod(in_dir, 0o755)
    assert 'Resized 7 images' in capsys.readouterr().out
    assert {n: (tmp_path / 'in' / n).read_bytes() for n in os.listdir(in_dir)} == before


def test_resize_bad_input(tmp_path):
    missing = tmp_path / 'train2014'
    proc = run('resize.py', '--image_dir', missing, '--output_dir', tmp_path / 'out', check=False)
    assert_one_line_error(proc, str(missing), 'train2014.zip')
    assert not (tmp_path / 'out').exists()
    missing.mkdir()
    proc = run('resize.py', '--image_dir', missing, '--output_dir', missing, check=False)
    assert_one_line_error(proc, 'overwrite')
    with pytest.raises(SystemExit) as e:
        resize.main(['--image_dir', str(missing), '--image_size', '0'])
    assert e.value.code == 2


# ---------------------------------------------------------------------------
# data_loader.load_coco and existing_images: every script reads caption files through them


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_load_coco_reads_a_caption_file(caption_file, capsys):
    coco = load_coco(str(caption_file))
    assert sorted(coco.anns) == [10 + i for i in range(len(CAPTIONS))] and coco.path == str(caption_file)
    assert coco.loadImgs(2)[0]['file_name'] == '2.jpg'
    assert 'loading annotations into memory...' in capsys.readouterr().out, "pycocotools' line, as users know it"


@pytest.mark.parametrize('content,words', [
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 2, "image_id"',
     ['not valid JSON', 'truncated', 'annotations_trainval2014.zip']),
    (json.dumps([{'id': 1}]), ['JSON object', 'got a list', 'captions_']),
    (json.dumps({'images': []}), ["no 'annotations' list"]),
    (json.dumps({'annotations': [{'id': 1, 'image_id': 1, 'caption': 'a'}]}), ["no 'images' list"]),
    (json.dumps({'images': [{'id': 1, 'file_name': 'a.jpg'}],
                 'annotations': [{'id': 5, 'image_id': 424242, 'caption': 'a dog'}]}),
     ['annotation 5', 'image_id 424242', 'not among its 1 images']),
    (json.dumps({'images': [{'id': 1, 'file_name': 'a.jpg'}], 'annotations': []}), ["'annotations' list is empty"]),
    (json.dumps({'images': [{'id': 1, 'file_name': 'a.jpg'}], 'annotations': [{'id': 5, 'image_id': 1}]}),
     ["no 'caption'"]),
])
def test_load_coco_refuses_bad_caption_files_in_one_line(tmp_path, content, words):
    path = tmp_path / 'captions.json'
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_coco(str(path))
    message = str(e.value)
    assert '\n' not in message and str(path) in message and all(w in message for w in words), message


def test_load_coco_missing_file_says_where_captions_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match='annotations_trainval2014.zip'):
        load_coco(str(tmp_path / 'captions_train2014.json'))


def test_existing_images_skips_a_few_missing_and_refuses_most(tmp_path, capsys):
    images = [{'id': i, 'file_name': f'{i}.png'} for i in range(4)] + [{'id': 9, 'file_name': 'uncaptioned.png'}]
    anns = [{'id': 10 + i, 'image_id': i % 4, 'caption': 'a dog'} for i in range(8)]
    coco = load_coco(write_json(tmp_path / 'c.json', {'images': images, 'annotations': anns}))
    root = tmp_path / 'resized'
    root.mkdir()
    for i in (0, 1, 3):
        Image.new('RGB', (8, 8)).save(root / f'{i}.png')
    capsys.readouterr()
    assert existing_images(coco, str(root)) == [0, 1, 3]
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith('note: 1 of 4 pictures') and str(root / '2.png') in note[0], note
    os.remove(root / '0.png')
    assert existing_images(coco, str(root)) == [1, 3], 'half missing: still a few'
    os.remove(root / '1.png')
    with pytest.raises(FileNotFoundError) as e:
        existing_images(coco, str(root))
    assert str(e.value).startswith(f'3 of 4 pictures of {tmp_path / "c.json"} are not in {root}: resize them first')
    assert f'python resize.py --image_dir' in str(e.value) and f'--output_dir {root}' in str(e.value)


def test_coco_dataset_leaves_out_missing_pictures_and_checks_the_crop(tmp_path, capsys):
    from data_loader import CocoDataset, image_transform
    images = [{'id': i, 'file_name': f'{i}.png'} for i in range(3)]
    anns = [{'id': 10 + i, 'image_id': i % 3, 'caption': 'a dog'} for i in range(6)]
    path = write_json(tmp_path / 'c.json', {'images': images, 'annotations': anns})
    root = tmp_path / 'resized'
    root.mkdir()
    for i in (0, 2):
        Image.new('RGB', (40, 40)).save(root / f'{i}.png')
    vocab = Vocabulary.from_words(['a', 'dog'])
    dataset = CocoDataset(str(root), path, vocab, image_transform(32, train=True))
    assert dataset.item_image_ids() == [0, 2, 0, 2] and len(dataset) == 4
    assert all(dataset[i][0].shape == (3, 32, 32) for i in range(4))
    with pytest.raises(ValueError) as e:
        CocoDataset(str(root), path, vocab, image_transform(48, train=True))
    assert 'are 40 x 40' in str(e.value) and '--crop_size 40 or less' in str(e.value) and '\n' not in str(e.value)
    # one odd picture in a raw folder is scaled up to the crop, not a crash
    Image.new('RGB', (10, 4000)).save(root / '2.png')
    assert dataset[1][0].shape == (3, 32, 32)
    Image.new('RGB', (1, 1)).save(root / '2.png')
    assert dataset[1][0].shape == (3, 32, 32)


def test_load_image_scales_small_pictures_up(tmp_path):
    from data_loader import load_image
    for size in ((1, 1), (10, 4000), (4000, 10)):
        Image.new('RGB', size, 'red').save(tmp_path / 'odd.png')
        assert load_image(str(tmp_path / 'odd.png'), 24, 32).shape == (1, 3, 32, 32)
        assert load_image(str(tmp_path / 'odd.png'), 40, 32).shape == (1, 3, 32, 32)
