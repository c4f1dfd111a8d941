"""The GPU check, one command: everything CUDA in this repository, run and timed, in one table.

    python bench/gpu_check.py                 # on a CUDA GPU: under 10 minutes
    python bench/gpu_check.py --quick         # tiny sizes, no test suite: a minute

Without a CUDA GPU it says so in one line and exits 0. On one it runs, each step in its own
process with its own time limit, and goes on after a failure:
    tests        pytest -m cuda: every test skipped without a GPU (conftest marks them), which
                 covers the fused LSTM against cuDNN, CUDA <-> CPU parity, beam search and
                 a train.py checkpoint written on the GPU and loaded on the CPU
    bench_lstm   bench/bench_lstm.py --device cuda: case (d), my_LSTM against cuDNN
    bench_train  bench/bench_train.py --device cuda at batch 128: channels-last ResNet, fused
                 Adam, float32 (TF32); its peak GPU memory
    fp16, bf16   the same training step under autocast (fp16 with the GradScaler)
    coco         train.py for --coco_steps steps on a synthetic COCO-sized set written by
                 bench/make_coco.py (--coco_fraction of COCO's images), through the lab's
                 pipeline (build_vocab.py, resize.py, train.py), then --resume for a few steps
                 more: the CUDA RNG state and fused Adam's state come back from the checkpoint
Each step's full output goes to --log (default gpu_check.log); the table says what to look at.
Not covered: NCCL under torchrun with more than one GPU (run train.py under torchrun by hand).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
import cpu_env  # noqa: E402,F401  (first: OpenMP's settings must be in place before torch loads)
import torch  # noqa: E402

from report import cpu_name, print_table  # noqa: E402

QUICK = dict(coco_fraction=0.002, coco_steps=5, step_timeout=300)


def parse_table(text):
    """The rows of the last Markdown table in text, as dicts keyed by its header."""
    lines = text.splitlines()
    rules = [k for k, line in enumerate(lines) if line.startswith('|-')]
    if not rules:
        return []
    k = rules[-1]
    cells = lambda line: [c.strip() for c in line.strip().strip('|').split('|')]  # noqa: E731
    header, rows = cells(lines[k - 1]), []
    for line in lines[k + 1:]:
        if not line.startswith('| '):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


class Check:
    """Runs the steps, keeps the table's rows, writes every step's output to the log."""

    def __init__(self, args, log):
        self.args, self.log, self.rows = args, log, []

    def run(self, name, cmd, summarize=lambda out: '', cwd=REPO, timeout=None):
        """Run one command; add its row (ok/FAILED, seconds, summary). Returns its stdout, or None."""
        tic = time.perf_counter()
        self.log.write(f'\n===== {name}: {" ".join(cmd)}\n')
        self.log.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout or self.args.step_timeout)
            out, code = proc.stdout, proc.returncode
            self.log.write(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired as e:
            out, code = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ''), 'timeout'
            self.log.write(out + f'\n(timed out after {e.timeout} s)\n')
        seconds = time.perf_counter() - tic
        if code != 0:
            last = [line for line in (out or '').splitlines() if line.strip()][-1:] or ['']
            self.rows.append((name, 'FAILED', f'{seconds:.0f}', f'exit {code}: {last[0][:80]} (see the log)'))
            return None
        try:
            summary = summarize(out)
        except (KeyError, IndexError, ValueError) as e:   # the output changed shape: still say it ran
            summary = f'ran; could not read its table ({e!r}): see the log'
        self.rows.append((name, 'ok', f'{seconds:.0f}', summary))
        return out

    def skip(self, name, why):
        self.rows.append((name, 'skipped', '-', why))


def pytest_summary(out):
    return next((line.strip('= ') for line in reversed(out.splitlines()) if re.search(r'\d+ (passed|failed)', line)),
                out.strip().splitlines()[-1])


def lstm_summary(out):
    rows = [r for r in parse_table(out) if r['case'].startswith('(d)')]
    return '; '.join(f"{r['case'][:24]}: fused {r['fused ms']} ms vs cuDNN {r['nn.LSTM ms']} ms ({r['ratio']})"
                     for r in rows)


def train_summary(out):
    rows = {r['variant'][:3]: r for r in parse_table(out)}
    return (f"(a) pictures {rows['(a)']['captions/s']} captions/s, peak {rows['(a)']['peak GPU MB']} MB; "
            f"(b) features {rows['(b)']['captions/s']} captions/s, peak {rows['(b)']['peak GPU MB']} MB")


def coco_summary(out):
    losses = re.findall(r'Loss: ([0-9.]+)', out)
    return f'loss {losses[0]} -> {losses[-1]}' if losses else out.strip().splitlines()[-1][:80]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes, no test suite (flags given still win), to check that it runs')
    parser.add_argument('--device', default='cuda', help='the CUDA device to check. Default: cuda')
    parser.add_argument('--coco_fraction', type=float, default=0.1,
                        help="share of COCO's 82,783 training images bench/make_coco.py writes. Default: 0.1")
    parser.add_argument('--coco_steps', type=int, default=300, help='train.py steps on that set. Default: 300')
    parser.add_argument('--step_timeout', type=int, default=240, help='seconds each step may take. Default: 240')
    parser.add_argument('--log', default='gpu_check.log', help="every step's full output. Default: gpu_check.log")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f'gpu_check.py: no CUDA GPU here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): '
              f'nothing to check')
        return
    tic = time.perf_counter()
    py = sys.executable
    lstm, train = os.path.join(BENCH, 'bench_lstm.py'), os.path.join(BENCH, 'bench_train.py')
    quick = ['--quick'] if args.quick else []
    with open(args.log, 'w') as log, tempfile.TemporaryDirectory() as tmp:
        check = Check(args, log)
        if args.quick:
            check.skip('tests', '--quick')
        else:
            check.run('tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', 'tests'],
                      pytest_summary)
        check.run('bench_lstm', [py, lstm, '--device', args.device] + quick, lstm_summary)
        batch = [] if args.quick else ['--batch_size', '128']
        check.run('bench_train', [py, train, '--device', args.device] + batch + quick, train_summary)
        short = ['--rounds', '1', '--warmup', '0', '--round_s', '0.2']
        check.run('fp16 step', [py, train, '--device', args.device, '--amp', 'fp16'] + batch + short + quick,
                  train_summary)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            check.run('bf16 step', [py, train, '--device', args.device, '--amp', 'bf16'] + batch + short + quick,
                      train_summary)
        else:
            check.skip('bf16 step', f'{torch.cuda.get_device_name(args.device)} has no native bf16')
        coco_run(check, args, tmp)

    print(f'GPU check: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, CUDA '
          f'{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; host {cpu_name()}, {os.cpu_count()} '
          f'cores; {time.perf_counter() - tic:.0f} s in all; full output in {args.log}')
    print_table(('step', 'result', 'seconds', 'figures'), check.rows)


def coco_run(check, args, tmp, extra=()):
    """bench/make_coco.py's set through build_vocab.py, resize.py and train.py (its defaults, then
    `extra` flags), then --resume."""
    make_coco = os.path.join(BENCH, 'make_coco.py')
    if not os.path.isfile(make_coco):
        check.skip('coco', 'skipped: bench/make_coco.py missing')
        return
    py, root, data = sys.executable, os.path.join(tmp, 'coco'), os.path.join(tmp, 'data')
    script = lambda name: os.path.join(REPO, name)  # noqa: E731
    if check.run('coco: make_coco', [py, make_coco, '--fraction', str(args.coco_fraction), '--root', root]) is None:
        return
    vocab = os.path.join(data, 'vocab.pkl')
    steps = [('coco: build_vocab', [py, script('build_vocab.py'), '--vocab_path', vocab, '--caption_path',
                                    os.path.join(root, 'annotations', 'captions_train2014.json')]),
             ('coco: resize', [py, script('resize.py'), '--image_dir', os.path.join(root, 'train2014'),
                               '--output_dir', os.path.join(data, 'resized2014')]),
             ('coco: resize val', [py, script('resize.py'), '--image_dir', os.path.join(root, 'val2014'),
                                   '--output_dir', os.path.join(data, 'resizedval2014')])]
    for name, cmd in steps:
        if check.run(name, cmd) is None:
            return
    models = os.path.join(tmp, 'models')
    train = [py, script('train.py'), '--device', args.device, '--encoder_weights', 'none', '--vocab_path', vocab,
             '--image_dir', os.path.join(data, 'resized2014'), '--val_image_dir', os.path.join(data, 'resizedval2014'),
             '--caption_path', os.path.join(root, 'annotations', 'captions_train2014.json'),
             '--val_caption_path', os.path.join(root, 'annotations', 'captions_val2014.json'),
             '--model_path', models, '--log_step', '25', '--num_epochs', '1', *extra]
    if check.run(f'coco: train {args.coco_steps} steps', train + ['--max_steps', str(args.coco_steps)],
                 coco_summary, timeout=2 * args.step_timeout) is None:
        return
    check.run('coco: --resume', train + ['--resume', os.path.join(models, 'latest.pt'),
                                         '--max_steps', str(args.coco_steps + 10)], coco_summary)


if __name__ == '__main__':
    main()
