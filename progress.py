"""Progress of long work that shows on a terminal and in a log file alike.

    for ann in progress(anns, desc='tokenizing captions', unit='captions'):
        ...
    with progress(total=len(images), desc='feature cache', unit='images') as bar:
        bar.update(len(batch))

On a terminal it is tqdm's bar (on stderr). Where stdout is a file or a pipe, as under
`nohup python train.py > train.log &`, it prints plain lines on stdout instead, flushed at once:

    feature cache: 20,608/82,783 images (25%) | 38.1 images/s | 9:01 elapsed | 27:12 left

one each time another 5% is done, but at most one per INTERVAL_S / 3 and at least one per
INTERVAL_S while the work goes on, and a last one when it ends; a tqdm bar redrawn into a file
would be unreadable, and none at all leaves the log silent for minutes. The environment variable
PROGRESS_INTERVAL_S sets INTERVAL_S (default 30 s; 0 prints every 5%, as tests want).
"""
import os
import sys
import time

from tqdm import tqdm

PERCENT_STEP = 5
DEFAULT_INTERVAL_S = 30.0


def interval_s():
    """The longest silence between two lines: $PROGRESS_INTERVAL_S, or 30 s."""
    try:
        return max(0.0, float(os.environ.get('PROGRESS_INTERVAL_S', DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def duration(seconds):
    """65 -> '1:05', 3725 -> '1:02:05'."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
    """A tqdm-like counter (iterate it, or call update) that draws a bar on a terminal and
    writes rate-limited lines into a log file; see the module docstring.

    Args:
        iterable: what to iterate over, counted one item at a time. Default: None (call update)
        total: how many units there will be; None: len(iterable) if it has one, else unknown
            (the lines then give the count and rate, not the share and time left)
        desc: what is being done, e.g. 'resizing'
        unit: what is counted, e.g. 'images'. Default: 'items'
        bar: draw tqdm's bar on stderr. Default (None): where stderr is a terminal
            (under torchrun, neither bar nor lines but on rank 0)
        lines: print the plain lines. Default (None): unless stdout and stderr are both
            terminals (then the bar says it all)
        file: where the lines go. Default: sys.stdout at the time of each line
        clock: seconds as a float (tests pass a fake one). Default: time.monotonic
        interval: the longest silence, in seconds. Default: interval_s()
    """

    def __init__(self, iterable=None, total=None, desc='', unit='items', bar=None, lines=None, file=None,
                 clock=time.monotonic, interval=None):
        if total is None and iterable is not None and hasattr(iterable, '__len__'):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        stdout_tty, stderr_tty = _isatty(sys.stdout), _isatty(sys.stderr)
        speaks = rank_zero()  # under torchrun every rank does the same work: one reports it
        self.bar = tqdm(total=total, desc=desc, unit=f' {unit}', leave=False, dynamic_ncols=True) \
            if (stderr_tty if bar is None else bar) and speaks else None
        self.lines = speaks and (not (stdout_tty and stderr_tty) if lines is None else lines)
        self.file, self.clock = file, clock
        self.interval = interval_s() if interval is None else interval
        self.count, self.postfix, self.closed = 0, '', False
        self.start = self.last = clock()
        self.next_percent = PERCENT_STEP

    def __iter__(self):
        # the count goes up once an item's work is done, when the loop asks for the next one;
        # a loop left early (break, an exception) prints no closing line
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close(quiet=kind is not None)  # an error or Ctrl-C says for itself why the work stopped

    def update(self, n=1):
        """n more units done: redraw the bar, and print a line when one is due."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        if not self.lines:
            return
        now = self.clock()
        since = now - self.last
        if self.total:
            percent = 100 * self.count / self.total
            due = percent >= self.next_percent and since >= self.interval / 3 or 0 < self.interval <= since
            if due and self.count < self.total:  # the whole is close()'s line
                self.next_percent = (percent // PERCENT_STEP + 1) * PERCENT_STEP
                self._line(now)
        elif since >= self.interval:
            self._line(now)

    def set_postfix(self, **values):
        """Extra figures for the bar and the next lines, e.g. loss=2.31."""
        self.postfix = ', '.join(f'{k} {v}' for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self, quiet=False):
        """Remove the bar; print the closing line (count, rate, time taken) unless quiet."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.lines and not quiet:
            self._line(self.clock(), final=True)

    @staticmethod
    def write(message, file=None):
        """Print a line without breaking a bar being drawn (tqdm.write)."""
        tqdm.write(message, file=file)

    def _line(self, now, final=False):
        self.last = now
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f'{self.count:,}' + (f'/{self.total:,}' if self.total else '')
        parts = [f'{self.desc}: {done} {self.unit}' + (f' ({100 * self.count / self.total:.0f}%)'
                                                          if self.total and not final else '')]
        parts.append(f'{rate:,.1f} {self.unit}/s')
        if final:
            parts.append(f'{duration(elapsed)} in all')
        else:
            parts.append(f'{duration(elapsed)} elapsed')
            if self.total and rate > 0:
                parts.append(f'{duration((self.total - self.count) / rate)} left')
        if self.postfix:
            parts.append(self.postfix)
        line, file = ' | '.join(parts), self.file or sys.stdout
        if self.bar is not None and _isatty(file):
            tqdm.write(line, file=file)  # above the bar, which it would otherwise break
        else:
            print(line, file=file, flush=True)


def progress(iterable=None, total=None, desc='', unit='items', **kwargs):
    """Progress(...): the one way every script shows how far long work has got."""
    return Progress(iterable, total=total, desc=desc, unit=unit, **kwargs)


def rank_zero():
    """True in the process that reports for the run: rank 0 under torchrun, or the only one.
    torch is looked up, not imported: scripts that never load it (build_vocab.py) stay light."""
    dist = sys.modules.get('torch.distributed')
    return dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False
