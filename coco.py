"""COCO caption files, read and checked: load_coco, and existing_images (which pictures are there).

Nothing here imports torch: build_vocab.py counts words with it alone.
"""
import json
import os
import sys
import time

from pycocotools.coco import COCO

COCO_ANNOTATIONS_URL = 'http://images.cocodataset.org/annotations/annotations_trainval2014.zip'


def load_coco(json_path):
    """Read a COCO caption file into a pycocotools COCO object, checked first.

    pycocotools trusts the file: a truncated download, a JSON list or an annotation of an
    image the file does not list fail later with a bare JSONDecodeError, AssertionError or
    KeyError. Here each is one ValueError naming the file and the fix, and a missing file
    is a FileNotFoundError saying where COCO's caption files come from.
    The COCO object remembers the file as ``coco.path``.
    """
    fix = f'download it again ({COCO_ANNOTATIONS_URL}, unzip into data/) or pass another caption file'
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f'caption file {json_path} not found: download {COCO_ANNOTATIONS_URL} and unzip it '
                                f'into data/ (it holds data/annotations/captions_train2014.json and _val2014.json)')
    print('loading annotations into memory...')  # pycocotools' own lines, which users know
    tic = time.time()
    try:
        with open(json_path, encoding='utf-8') as f:
            dataset = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f'{json_path} is not a COCO caption file (not UTF-8 text): {fix}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{json_path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; '
                         f'truncated?): {fix}') from None
    problem = _coco_problem(dataset)
    if problem:
        raise ValueError(f'{json_path} is not a COCO caption file: {problem}')
    print(f'Done (t={time.time() - tic:0.2f}s)')
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    coco.path = json_path
    return coco


def _coco_problem(dataset):
    """What makes a parsed JSON file unusable as COCO captions, with the fix; None when fine."""
    example = 'pass a captions_*.json file such as data/annotations/captions_train2014.json'
    if not isinstance(dataset, dict):
        return f"expected a JSON object with 'images' and 'annotations', got a {type(dataset).__name__}: {example}"
    lacking = [key for key in ('images', 'annotations') if not isinstance(dataset.get(key), list)]
    if lacking:
        return f"it has no {' or '.join(repr(k) for k in lacking)} list: {example}"
    images, annotations = dataset['images'], dataset['annotations']
    if not annotations:
        return f"its 'annotations' list is empty, so there is nothing to learn from: {example}"
    for image in images:
        if not isinstance(image, dict) or 'id' not in image or 'file_name' not in image:
            return f"an image lacks 'id' or 'file_name' ({str(image)[:60]}): {example}"
    for ann in annotations:
        if not isinstance(ann, dict) or 'id' not in ann or 'image_id' not in ann:
            return f"an annotation lacks 'id' or 'image_id' ({str(ann)[:60]}): {example}"
        if 'caption' not in ann:  # e.g. instances_train2014.json
            return f"annotation {ann['id']} has no 'caption' (an instances or keypoints file?): {example}"
    ids = {image['id'] for image in images}
    strays = [ann for ann in annotations if ann['image_id'] not in ids]
    if strays:
        more = f' (and {len(strays) - 1} more)' if len(strays) > 1 else ''
        return (f"annotation {strays[0]['id']}{more} names image_id "
                f"{strays[0]['image_id']}, which is not among its {len(ids)} images: remove those annotations "
                f"or download the file again")
    return None


_NOTED = set()  # (caption file, folder) pairs whose missing pictures were noted


def existing_images(coco, root):
    """Sorted ids of the captioned images of `coco` whose file is in `root`.

    A few missing pictures (resize.py skips corrupt ones) are left out with a note on
    stderr; when more than half are missing, the folder is not the resized one: raises
    FileNotFoundError saying how to make it.
    """
    captioned = sorted(i for i in coco.imgToAnns if coco.imgToAnns[i])
    missing = [i for i in captioned if not os.path.isfile(os.path.join(root, coco.imgs[i]['file_name']))]
    where = getattr(coco, 'path', 'the caption file')
    if 2 * len(missing) > len(captioned):
        raise FileNotFoundError(
            f'{len(missing)} of {len(captioned)} pictures of {where} are not in {root}: resize them first: '
            f'python resize.py --image_dir <folder of the original pictures> --output_dir {root}')
    if missing and (where, root) not in _NOTED:  # once, though training and validation both look
        _NOTED.add((where, root))
        first = os.path.join(root, coco.imgs[missing[0]]['file_name'])
        print(f'note: {len(missing)} of {len(captioned)} pictures of {where} are not in {root} (e.g. {first}, '
              f'which resize.py may have skipped as corrupt); their captions are left out', file=sys.stderr)
    gone = set(missing)
    return [i for i in captioned if i not in gone]
