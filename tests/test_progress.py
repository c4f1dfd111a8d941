"""progress.Progress: lines into a log file, rate-limited by a (fake) clock."""
import io

from progress import Progress, duration


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(total=1000, interval=30.0, **kw):
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(total=total, desc='work', unit='images', bar=False, lines=True, file=out, clock=clock,
                   interval=interval, **kw)
    return bar, clock, out


def lines(out):
    return out.getvalue().splitlines()


def test_fast_work_prints_every_5_percent_but_not_more_often_than_a_third_of_the_interval():
    bar, clock, out = make(total=1000, interval=30.0)
    for _ in range(1000):  # 1 s per item: 50 s per 5%, more than 10 s apart
        clock.now += 1.0
        bar.update(1)
    bar.close()
    got = lines(out)
    # 5%, 10%, ..., 95% (100% is the closing line), and the 30 s rule never fires between them:
    # with 50 s between two 5% marks it fires first, at 30 s, then the 5% mark waits for 10 s more
    assert all(' | ' in line for line in got)
    percents = [int(line.split('(')[1].split('%')[0]) for line in got[:-1]]
    assert percents == sorted(percents) and percents[-1] >= 95
    gaps = []
    previous = 0.0
    for line in got[:-1]:
        elapsed = line.split(' | ')[2].split(' ')[0]
        m, s = map(int, elapsed.split(':'))
        gaps.append(60 * m + s - previous)
        previous = 60 * m + s
    assert max(gaps) <= 30 and min(gaps) >= 10
    assert got[-1] == 'work: 1,000/1,000 images | 1.0 images/s | 16:40 in all'


def test_quick_work_prints_only_the_closing_line():
    bar, clock, out = make(total=1000, interval=30.0)
    for _ in range(1000):
        clock.now += 0.001  # 1 s for all of it: no 5% mark is 10 s after the last line
        bar.update(1)
    bar.close()
    assert lines(out) == ['work: 1,000/1,000 images | 1,000.0 images/s | 0:01 in all']


def test_slow_work_prints_at_least_every_interval():
    bar, clock, out = make(total=10 ** 6, interval=30.0)
    for _ in range(100):
        clock.now += 7.0  # 0.0001% per update: only the clock makes a line due
        bar.update(1)
    got = lines(out)
    assert len(got) == 700 // 35  # a line at 35, 70, ... s (the first update 30 s or more after the last)
    assert got[0] == 'work: 5/1,000,000 images (0%) | 0.1 images/s | 0:35 elapsed | 1944:26:05 left'


def test_interval_zero_prints_each_5_percent_and_unknown_total_prints_counts():
    bar, clock, out = make(total=100, interval=0.0)
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert len(lines(out)) == 19 + 1  # 5%, ..., 95%, and the closing line

    bar, clock, out = make(total=None, interval=10.0)
    for _ in range(5):
        clock.now += 6.0
        bar.update(3)
    assert lines(out) == ['work: 6 images | 0.5 images/s | 0:12 elapsed',
                          'work: 12 images | 0.5 images/s | 0:24 elapsed']


def test_iterating_counts_items_and_an_error_or_a_break_prints_no_closing_line():
    out = io.StringIO()
    assert list(Progress(range(4), desc='d', bar=False, lines=True, file=out, interval=30)) == [0, 1, 2, 3]
    assert lines(out) == [lines(out)[0]] and lines(out)[0].startswith('d: 4/4 items | ')

    out = io.StringIO()
    try:
        with Progress(total=10, desc='d', bar=False, lines=True, file=out) as bar:
            bar.update(3)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue() == ''

    out = io.StringIO()
    for i in Progress(range(10), desc='d', bar=False, lines=True, file=out, interval=30):
        if i == 2:
            break
    assert out.getvalue() == ''


def test_duration():
    assert (duration(5), duration(65), duration(3725)) == ('0:05', '1:05', '1:02:05')
