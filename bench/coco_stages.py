"""Time every stage of a run on a synthetic COCO-sized set, as a user's log file would show it.

    python bench/coco_stages.py --fraction 1 --root /tmp/coco     # COCO's full size: under 20 minutes on 2 cores
    python bench/coco_stages.py --quick                           # a few dozen pictures, under a minute

Makes the set (bench/make_coco.py), then runs build_vocab.py, resize.py (train and val),
train.py (small pictures and crops, random ResNet weights, cached features, --max_steps,
--select_by bleu4) and evaluate.py one after the other, each with its output into a pipe, as
`nohup python train.py > train.log &` has it: no terminal, so no progress bars, only lines.
Each line is stamped as it arrives; the table gives each stage's time, peak memory
(/usr/bin/time -v, where there is one), what it left on disk, and the longest silence in its
log (from the start to the first line, between two lines, or from the last line to the end).
train.py's sub-stages are read off its log: from the line before the first of their lines to
the last of them; its training steps, from the last caption-encoding line to the first line
after training. Logs go to ROOT/logs/.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cpu_env  # noqa: E402,F401  (first, as in every script)
from utils import cpu_info  # noqa: E402

TIME = '/usr/bin/time'
# train.py's sub-stages: the prefix of their lines
TRAIN_PARTS = (('feature cache (train)', 'feature cache', 0), ('encoding captions (train)', 'encoding captions', 0),
               ('feature cache (val)', 'feature cache', 1), ('encoding captions (val)', 'encoding captions', 1),
               ('validation', 'validating', 0),
               ('--select_by bleu4', 'captioning for --select_by', 0))


def du(*paths):
    """Bytes under paths (files or folders)."""
    total = 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
        for folder, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def run_stage(name, argv, root, env):
    """Run argv with stdout+stderr into a pipe; returns (seconds, peak RSS in MB or None, [(t, line)])."""
    logs = os.path.join(root, 'logs')
    os.makedirs(logs, exist_ok=True)
    slug = re.sub(r'\W+', '_', name).strip('_')
    mem_file = os.path.join(logs, f'{slug}.time')
    command = [sys.executable, *argv]
    if os.access(TIME, os.X_OK):
        command = [TIME, '-v', '-o', mem_file] + command
    print(f'== {name}: {" ".join(map(str, argv))}', flush=True)
    tic = time.monotonic()
    stamped = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True, bufsize=1) as proc, open(os.path.join(logs, f'{slug}.log'), 'w') as log:
        for line in proc.stdout:
            t = time.monotonic() - tic
            stamped.append((t, line.rstrip('\n')))
            log.write(f'{t:9.2f} {line}')
            log.flush()  # readable while the stage runs
    seconds = time.monotonic() - tic
    if proc.returncode:
        sys.exit(f'{name} failed (exit {proc.returncode}); see {log.name}')
    peak = None
    if os.path.exists(mem_file):
        with open(mem_file) as f:
            found = re.search(r'Maximum resident set size \(kbytes\): (\d+)', f.read())
        peak = int(found.group(1)) / 1024 if found else None
    return seconds, peak, stamped


def longest_silence(stamped, start, end):
    """The longest time between two stamps, counting the start and the end."""
    times = [start] + [t for t, _ in stamped if start <= t <= end] + [end]
    return max(b - a for a, b in zip(times, times[1:]))


def part(stamped, prefix, occurrence):
    """(start, end) of the `occurrence`-th run of lines starting with prefix, or None."""
    runs, current = [], None
    for i, (t, line) in enumerate(stamped):
        if line.startswith(prefix):
            if current is None:
                current = [stamped[i - 1][0] if i else 0.0, t]
            current[1] = t
        elif current is not None:
            runs.append(current)
            current = None
    if current is not None:
        runs.append(current)
    return tuple(runs[occurrence]) if occurrence < len(runs) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--root', type=str, default=None, help='where the set and logs go; not given: a temporary folder')
    parser.add_argument('--fraction', type=float, default=1.0, help="share of COCO 2014's sizes")
    parser.add_argument('--quick', action='store_true', help="make_coco.py's --quick set, 2 steps")
    parser.add_argument('--max_steps', type=int, default=300, help="train.py's --max_steps")
    parser.add_argument('--num_workers', type=int, default=2, help="train.py's and evaluate.py's --num_workers")
    parser.add_argument('--keep', action='store_true', help='keep a temporary --root')
    args = parser.parse_args(argv)
    root = args.root or os.path.join('/tmp', f'coco_stages_{os.getpid()}')
    steps = 2 if args.quick else args.max_steps
    env = dict(os.environ)
    ann = os.path.join(root, 'annotations')
    train_json, val_json = os.path.join(ann, 'captions_train2014.json'), os.path.join(ann, 'captions_val2014.json')
    vocab, models = os.path.join(root, 'vocab.pkl'), os.path.join(root, 'models')
    rtrain, rval = os.path.join(root, 'resized2014'), os.path.join(root, 'resizedval2014')
    results = os.path.join(root, 'results.json')
    make = ['bench/make_coco.py', '--root', root] + (['--quick'] if args.quick else ['--fraction', args.fraction])
    stages = [
        ('make_coco.py', make, [os.path.join(root, d) for d in ('annotations', 'train2014', 'val2014')]),
        ('build_vocab.py', ['build_vocab.py', '--caption_path', train_json, '--vocab_path', vocab], [vocab]),
        ('resize.py train', ['resize.py', '--image_dir', os.path.join(root, 'train2014'), '--output_dir', rtrain,
                             '--image_size', 40], [rtrain]),
        ('resize.py val', ['resize.py', '--image_dir', os.path.join(root, 'val2014'), '--output_dir', rval,
                           '--image_size', 40], [rval]),
        ('train.py', ['train.py', '--encoder_weights', 'none', '--crop_size', 32, '--image_size', 40,
                      '--augment', 'none', '--image_dir', rtrain, '--caption_path', train_json, '--val_image_dir',
                      rval, '--val_caption_path', val_json, '--vocab_path', vocab, '--model_path', models,
                      '--max_steps', steps, '--select_by', 'bleu4', '--num_workers', args.num_workers],
         [models, os.path.join(root, 'features')]),
        ('evaluate.py', ['evaluate.py', '--checkpoint', os.path.join(models, 'best.pt'), '--image_dir', rval,
                         '--caption_path', val_json, '--results_path', results, '--num_workers', args.num_workers],
         [results]),
    ]
    rows = []
    for name, argv_, outputs in stages:
        seconds, peak, stamped = run_stage(name, [str(a) for a in argv_], root, env)
        rows.append((name, seconds, peak, du(*outputs) / 1e6, longest_silence(stamped, 0.0, seconds)))
        if name == 'train.py':
            starts = [t for t, line in stamped if line.startswith('encoding captions')]
            ends = [t for t, line in stamped if line.startswith(('recalibrating bn', 'validating'))]
            if starts and ends:
                rows.append(('  training steps', ends[0] - starts[-1], None, None,
                             longest_silence(stamped, starts[-1], ends[0])))
            for label, prefix, occurrence in TRAIN_PARTS:
                span = part(stamped, prefix, occurrence)
                if span:
                    rows.append((f'  {label}', span[1] - span[0], None, None, longest_silence(stamped, *span)))

    with open('/proc/loadavg') as f:
        load = ' '.join(f.read().split()[:3])
    print(f'\n{cpu_info("model name") or "unknown CPU"}, {os.cpu_count()} cores, load average {load} at the end; '
          f'--fraction {0.0005 if args.quick else args.fraction}, train.py --max_steps {steps}')
    print('| stage | time (s) | peak memory (MB) | disk (MB) | longest silence in its log (s) |')
    print('|---|---:|---:|---:|---:|')
    for name, seconds, peak, disk, silence in rows:
        cells = [f'{seconds:.1f}', '' if peak is None else f'{peak:.0f}', '' if disk is None else f'{disk:.1f}',
                 f'{silence:.1f}']
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    if args.root is None and not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
