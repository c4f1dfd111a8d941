"""metrics.py: scores checked by hand on a tiny case, the Java-free tokenizer, METEOR with and without Java.

The reference values here are computed in this file from the metric definitions
(hand arithmetic and small re-implementations), never by calling pycocoevalcap.
Run: python -m pytest tests/test_metrics.py -q   (about 25 s with Java, METEOR's JVM is most of it)
"""
import math
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest

import metrics

JAVA = shutil.which('java') is not None
needs_java = pytest.mark.skipif(not JAVA, reason='java not on PATH')

# Three images, two references each. Raw text (capitals, final periods) so the tokenizer is
# exercised; after tokenisation every caption is the same words in lower case.
GTS = {'img1': ['A dog runs on the grass.', 'A brown dog is running across a lawn'],
       'img2': ['Two cats sleep on a red sofa.', 'two cats are lying on the couch'],
       'img3': ['A man rides a red bike.', 'A person riding a bicycle down the street.']}
RES = {'img1': 'A dog runs on the green grass.', 'img2': 'two cats on a sofa', 'img3': 'A man riding a bike.'}


def words(caption):
    return caption.lower().rstrip('.').split()


def ngrams(ws, n):
    return Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))


# ---------------------------------------------------------------------------------------
# Independent reference implementations (from the papers; comments say where the COCO code
# makes a choice the paper leaves open)
# ---------------------------------------------------------------------------------------

def ref_bleu(gts, res, max_n=4):
    """Corpus BLEU (Papineni et al. 2002): clipped n-gram counts summed over the corpus,
    one brevity penalty; the effective reference length of a sentence is the closest one
    (ties -> the shorter), as in coco-caption's bleu_scorer.py option='closest'."""
    matches, totals, c, r = [0] * max_n, [0] * max_n, 0, 0
    for i in res:
        cand, refs = words(res[i]), [words(x) for x in gts[i]]
        c += len(cand)
        r += min((abs(len(x) - len(cand)), len(x)) for x in refs)[1]
        for n in range(1, max_n + 1):
            best = Counter()
            for x in refs:
                best |= ngrams(x, n)                    # max count over references
            matches[n - 1] += sum(min(k, best[g]) for g, k in ngrams(cand, n).items())
            totals[n - 1] += max(0, len(cand) - n + 1)
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    precisions = [m / t for m, t in zip(matches, totals)]
    return [bp * math.prod(precisions[:n]) ** (1 / n) for n in range(1, max_n + 1)]


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def ref_rouge_l(gts, res, beta=1.2):
    """ROUGE-L (Lin 2004) F-measure with beta=1.2; over several references COCO takes the
    best precision and the best recall separately, then averages F over images."""
    fs = []
    for i in res:
        cand = words(res[i])
        ls = [(lcs(cand, words(x)), len(words(x))) for x in gts[i]]
        p, rec = max(l / len(cand) for l, _ in ls), max(l / n for l, n in ls)
        fs.append((1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if p and rec else 0.0)
    return sum(fs) / len(fs)


def ref_cider_d(gts, res, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015, sec. 8): per n, tf-idf vectors with idf = log(N / df)
    over the N images scored (df = images whose references contain the n-gram, at least 1),
    clipped cosine min(g_c, g_s) . g_s / (|g_c| |g_s|) times a Gaussian length penalty,
    times 10/m over the m references, averaged over n = 1..4 and over images.
    Like the COCO code (and unlike the paper) tf is the raw count, not count / length."""
    n_images = len(res)
    df = Counter()
    for i in res:
        for n in range(1, 5):
            df.update(set().union(*(ngrams(words(x), n) for x in gts[i])))

    def vec(ws, n):
        return {g: k * math.log(n_images / max(1.0, df[g])) for g, k in ngrams(ws, n).items()}

    per_image = []
    for i in res:
        cand, refs = words(res[i]), [words(x) for x in gts[i]]
        total = 0.0
        for n in range(1, 5):
            vc = vec(cand, n)
            for ref in refs:
                vs = vec(ref, n)
                norm = math.sqrt(sum(v * v for v in vc.values())) * math.sqrt(sum(v * v for v in vs.values()))
                dot = sum(min(v, vs.get(g, 0.0)) * vs.get(g, 0.0) for g, v in vc.items())
                penalty = math.exp(-(len(cand) - len(ref)) ** 2 / (2 * sigma ** 2))
                total += penalty * (dot / norm if norm else 0.0) * 10 / len(refs)
        per_image.append(total / 4)
    return sum(per_image) / len(per_image)


# ---------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------

def test_reference_bleu_matches_hand_arithmetic():
    # Clipped n-gram matches / candidate n-grams, image by image:
    #   img1 "a dog runs on the green grass" (7): 1-g 6/7, 2-g 4/6, 3-g 3/5, 4-g 2/4; refs 6 and 8
    #        words, both 1 away -> the shorter, 6
    #   img2 "two cats on a sofa" (5): 5/5, 2/4, 0/3, 0/2; refs 7 and 7 -> 7
    #   img3 "a man riding a bike" (5): 5/5 ("a" twice, ref 1 has it twice), 2/4, 0/3, 0/2; refs 6, 8 -> 6
    # p1 = 16/17, p2 = 8/14, p3 = 3/11, p4 = 2/8; c = 17 < r = 19 so BP = exp(1 - 19/17)
    p, bp = [16 / 17, 8 / 14, 3 / 11, 2 / 8], math.exp(1 - 19 / 17)
    hand = [bp * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)]
    assert ref_bleu(GTS, RES) == pytest.approx(hand, rel=1e-12)
    # LCS lengths with (ref 1, ref 2): img1 (6, 2), img2 (5, 3), img3 (4, 3)
    assert [[lcs(words(RES[i]), words(x)) for x in GTS[i]] for i in RES] == [[6, 2], [5, 3], [4, 3]]


def test_bleu_rouge_cider_match_independent_computation():
    scores, skipped = metrics.score_captions(GTS, RES, metrics=('BLEU', 'ROUGE_L', 'CIDEr'))
    assert skipped == {}
    assert list(scores) == ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L', 'CIDEr-D']
    # pycocoevalcap's BLEU adds 1e-15 to matches and 1e-9 to totals (no division by zero):
    # a relative change below 1e-9 here
    for n, expected in enumerate(ref_bleu(GTS, RES), 1):
        assert scores[f'BLEU-{n}'] == pytest.approx(100 * expected, rel=1e-6)
    assert scores['ROUGE-L'] == pytest.approx(100 * ref_rouge_l(GTS, RES), rel=1e-9)
    assert scores['CIDEr-D'] == pytest.approx(100 * ref_cider_d(GTS, RES), rel=1e-9)
    assert metrics.bleu4(GTS, RES) == scores['BLEU-4']
    assert metrics.cider_d(GTS, RES) == scores['CIDEr-D']


def test_perfect_captions_score_100():
    perfect = {i: refs[0] for i, refs in GTS.items()}
    scores, _ = metrics.score_captions(GTS, perfect, metrics=('BLEU', 'ROUGE_L'))
    for name in ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L'):
        assert scores[name] == pytest.approx(100.0, abs=1e-6), name
    assert metrics.bleu4(GTS, perfect) == pytest.approx(100.0, abs=1e-6)
    # and the shuffled-captions baseline the demo prints is far below
    shuffled = dict(zip(RES, [RES['img2'], RES['img3'], RES['img1']]))
    assert metrics.bleu4(GTS, shuffled) < 1.0


def test_cider_d_is_zero_for_a_single_image():
    # idf = log(N / df) with N = 1: every n-gram weighs 0 (documented in metrics.py)
    scores, _ = metrics.score_captions({1: GTS['img1']}, {1: RES['img1']}, metrics=('CIDEr',))
    assert scores == {'CIDEr-D': 0.0}


def test_bleu_prints_nothing_and_format_says_x100(capsys):
    scores, skipped = metrics.score_captions(GTS, RES, metrics=('BLEU',))
    assert capsys.readouterr().out == ''                # no 'ratio:' / {'testlen': ...} noise
    table = metrics.format_scores(scores, {'METEOR': 'java not found on PATH'})
    assert '(scores x100, as in the papers)' in table
    assert f"BLEU-4      {scores['BLEU-4']:.2f}" in table.splitlines()
    assert 'METEOR' in table and 'skipped: java not found on PATH' in table


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match='no references'):
        metrics.score_captions(GTS, {'nope': 'a dog'})
    with pytest.raises(ValueError, match='empty'):
        metrics.score_captions(GTS, {})
    with pytest.raises(ValueError, match='unknown metric'):
        metrics.score_captions(GTS, RES, metrics=('SPICE',))
    with pytest.raises(ValueError, match='tokenizer'):
        metrics.score_captions(GTS, RES, tokenizer='nltk')
    # extra images in gts are fine: only the ones in res are scored
    more = dict(GTS, img4=['a bird on a wire'])
    assert metrics.bleu4(more, RES) == metrics.bleu4(GTS, RES)


# ---------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('text, expected', [
    ('A dog, running.', 'a dog running'),
    ('A DOG. A CAT!', 'a dog a cat'),
    ("The dogs' toys aren't here; can't you see?", "the dogs toys are n't here ca n't you see"),
    ('He said "hello" to the man\'s dog...', "he said hello to the man 's dog"),
    ("It\u2019s a \u201cbig\u201d dog \u2013 really", "it 's a big dog really"),
    ('I cannot believe I\'m gonna win', "i can not believe i 'm gon na win"),
    ('A black-and-white photo -- of 3.5 cats, 1,000 dogs - and a t-shirt',
     'a black-and-white photo of 3.5 cats 1,000 dogs and a t-shirt'),
    # brackets become -lrb- ... and survive: pycocoevalcap's filter lists them in upper case
    # but the Java tokenizer runs with -lowerCase (a quirk of the COCO pipeline, kept on purpose)
    ('Two (small) dogs [on] a {red} couch', 'two -lrb- small -rrb- dogs -lsb- on -rsb- a -lcb- red -rcb- couch'),
    ('A sign for St. Mark\'s at 5 p.m. in the U.S.', "a sign for st. mark 's at 5 p.m. in the u.s."),
    ('What a view!!! ?!', 'what a view !!! ?!'),
    ('...', ''),
])
def test_ptb_tokenize(text, expected):
    assert metrics.ptb_tokenize(text) == expected


def test_punctuation_list_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer import ptbtokenizer
    assert metrics.PUNCTUATIONS == ptbtokenizer.PUNCTUATIONS


# COCO-style captions, with the usual typos, plus the punctuation people use in them
CAPTIONS = [
    'A man riding a wave on top of a surfboard.',
    'a couple of people that are standing in the grass',
    "A dog's head sticking out of a car window, looking at the camera.",
    'Two giraffes standing next to each other in a field .',
    'A kitchen with a stove, a sink and a refrigerator',
    'a plate of food with broccoli , rice and meat',
    'An old black-and-white photo of a street car.',
    "A woman's hand holding a hot-dog with ketchup & mustard",
    "The cat isn't sleeping; it's watching the birds!",
    'A close-up of a pizza (with pepperoni) on a table',
    'People waiting for the 10:30 train at the station...',
    'A 747 airplane flying over 2 buildings',
    'A sign that says "STOP" at the corner of Main St. and 5th Ave.',
    'a bus parked on the side of the road,next to a tree',
    "Children's toys scattered on the floor of a kid's room",
    'a man in a t-shirt and jeans plays frisbee w/ his dog',
    'A bowl of fruit: apples, oranges and bananas.',
    'Is this a zebra or a horse?',
    'Two people riding skis down a snowy slope -- very fast',
    'a tennis player swinging his racket at the ball.A crowd watches',
    'A 10-year-old boy flying a kite in the U.S. park',
    'A group of people gonna play baseball',
    'A  table   with many   spaces',
    "the dogs' owner walks them at 5 p.m. every day",
    "A clock tower reads 3 o'clock",
    'A red double-decker bus in London, England',
    'Someone cannot find their cell phone',
    'A TV on a stand in a living room',
    'A teddy bear sitting on a bed w/ pillows',
    'it’s a “big” dog – isn’t it',
    'Mr. and Mrs. Smith cut their wedding cake',
    'an elephant at the zoo, eating hay.',
    'A cake that reads "Happy 50th!"',
    'a bathroom with a toilet & sink (and a mirror)',
    'Snow-covered mountains behind a ski lodge; skiers in front',
    'A man & a woman, 50% off sale',
]


def generated_captions(n, seed):
    """Caption-like sentences: common words, contractions, numbers, abbreviations and
    punctuation glued on at random."""
    rng = random.Random(seed)
    vocab = ("a an the man woman dog dogs cat people two of on in at with next to riding holding red white "
             "large small is are it's that's there's don't isn't can't man's dogs' o'clock t-shirt "
             "black-and-white close-up 10-year-old St. Mr. U.S. 3.5 1,000 10:30 747 5th").split()
    marks = [',', '.', '!', '?', ';', ':', '-', '--', '...', '(', ')', '"', "'", '&', '/', '%', '$']
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 12)):
            w = rng.choice(vocab)
            w = w.capitalize() if rng.random() < 0.2 else w
            r = rng.random()
            if r < 0.15:
                w += rng.choice(marks)               # "dog," "dog)"
            elif r < 0.2:
                w = rng.choice(marks) + w            # "(dog" '"dog'
            elif r < 0.3:
                parts.append(rng.choice(marks))      # " - "
            parts.append(w)
        out.append(' '.join(parts) + rng.choice(['.', '', ' .', '!']))
    return out


@needs_java
def test_ptb_tokenize_matches_java_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    captions = CAPTIONS + generated_captions(400, seed=0)
    # Java's lexer peeks at the next line: a caption ending in "a." loses the period only if
    # the next one starts like "The ..." (ptb_tokenize assumes so). Make that true here.
    lines = {(k, 0): [{'caption': c}, {'caption': 'The end'}] for k, c in enumerate(captions)}
    java = PTBTokenizer().tokenize(lines)
    for k, c in enumerate(captions):
        assert metrics.ptb_tokenize(c) == java[(k, 0)][0], c


@needs_java
def test_python_and_java_tokenizers_give_the_same_scores():
    py, _ = metrics.score_captions(GTS, RES, metrics=('BLEU', 'ROUGE_L', 'CIDEr'), tokenizer='python')
    java, _ = metrics.score_captions(GTS, RES, metrics=('BLEU', 'ROUGE_L', 'CIDEr'), tokenizer='ptb')
    assert py == java


def test_ptb_tokenizer_without_java_says_so(monkeypatch):
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    with pytest.raises(RuntimeError, match="needs Java.*tokenizer='python'"):
        metrics.score_captions(GTS, RES, tokenizer='ptb')


# ---------------------------------------------------------------------------------------
# METEOR: runs with Java, reported as skipped (with the reason) without it or when it fails
# ---------------------------------------------------------------------------------------

@needs_java
def test_meteor_runs_with_java():
    # one call: METEOR's JVM loads a 60 MB paraphrase table (~20 s on a 2-core machine)
    scores, skipped = metrics.score_captions(GTS, RES)
    assert skipped == {}
    assert list(scores) == list(metrics.METRIC_NAMES)
    assert 0 < scores['METEOR'] < 100
    assert 'skipped' not in metrics.format_scores(scores, skipped)


def test_meteor_is_skipped_without_java(monkeypatch):
    monkeypatch.setattr(shutil, 'which', lambda name: None)

    def no_process(*args, **kwargs):
        raise AssertionError('no subprocess may start when java is missing')
    monkeypatch.setattr(subprocess, 'Popen', no_process)
    scores, skipped = metrics.score_captions(GTS, RES)
    assert 'METEOR' not in scores and 'java' in skipped['METEOR']
    assert set(scores) == set(metrics.METRIC_NAMES) - {'METEOR'}
    assert 'METEOR      skipped: java not found on PATH' in metrics.format_scores(scores, skipped)


def test_meteor_failure_is_reported_not_raised(monkeypatch):
    # a "JVM" that dies at once with an error message, as java does without its data files
    import pycocoevalcap.meteor.meteor as meteor_module
    real_popen = subprocess.Popen

    def dying_java(cmd, **kwargs):
        return real_popen([sys.executable, '-c', 'import sys; sys.stderr.write("Error: no paraphrase table\\n")'],
                          **kwargs)
    monkeypatch.setattr(shutil, 'which', lambda name: '/usr/bin/java')
    monkeypatch.setattr(meteor_module.subprocess, 'Popen', dying_java)
    scores, skipped = metrics.score_captions(GTS, RES, metrics=('METEOR', 'BLEU'))
    assert 'METEOR' not in scores and 'BLEU-4' in scores
    assert 'no paraphrase table' in skipped['METEOR']


def test_meteor_missing_jar_is_reported(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_module
    monkeypatch.setattr(shutil, 'which', lambda name: '/usr/bin/java')
    monkeypatch.setattr(meteor_module, 'METEOR_JAR', 'no-such-meteor.jar')
    _, skipped = metrics.score_captions(GTS, RES, metrics=('METEOR',))
    assert 'no-such-meteor.jar is missing' in skipped['METEOR']
