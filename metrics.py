"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, the COCO way.

The numbers come from the reference implementations of the COCO caption
evaluation server (the ``pycocoevalcap`` package, https://github.com/salaniz/pycocoevalcap):
Bleu(4), Meteor(), Rouge() and Cider(). Only the tokeniser is ours:
pycocoevalcap's PTBTokenizer starts a Java process (Stanford CoreNLP 3.4.1) for
every call, so ``ptb_tokenize`` re-implements what it produces in pure Python
and nothing here needs Java except METEOR, which is skipped, with the reason,
when Java is missing or fails.

All scores are on the 0-100 scale the papers use (BLEU 0.72 -> 72.0, CIDEr-D
1.05 -> 105.0).

Example::

    >>> from metrics import score_captions, format_scores
    >>> gts = {1: ['A dog runs on the grass.', 'a brown dog running'],
    ...        2: ['Two cats sleep on a red sofa.', 'two cats on a couch']}
    >>> res = {1: 'a dog running on the grass', 2: 'two cats sleeping on a sofa'}
    >>> scores, skipped = score_captions(gts, res)
    >>> print(format_scores(scores, skipped))       # doctest: +SKIP

Metric names (the keys of ``scores``), in COCO's order:
    BLEU-1 BLEU-2 BLEU-3 BLEU-4 METEOR ROUGE-L CIDEr-D

Things worth knowing when comparing numbers:
    * BLEU is corpus-level (clipped n-gram counts summed over all images, one
      brevity penalty for the corpus, 'closest' reference length), not a mean
      of sentence BLEUs.
    * "CIDEr-D": pycocoevalcap's ``Cider`` class is the CIDEr-D variant the COCO
      server reports (Gaussian length penalty with sigma=6, clipped n-gram
      counts, times 10), https://arxiv.org/abs/1411.5726 section 8. Its idf comes
      from the references of the images being scored, so it depends on which
      images are in the set: scores on a small validation subset are not
      comparable with full-split numbers, and with a single image it is 0.
    * BLEU has tiny smoothing constants (1e-15, 1e-9) so a BLEU-4 with no
      matching 4-gram is tiny (0.01 or less on this scale) but not exactly 0.
    * bleu4() and cider_d() are the quick single numbers for model selection.
"""
import contextlib
import functools
import os
import re
import shutil
import threading
import time
import unicodedata

__all__ = ['ptb_tokenize', 'score_captions', 'format_scores', 'bleu4', 'cider_d', 'METRIC_NAMES', 'PUNCTUATIONS']

# output keys, in the order the COCO server (and most papers) list them
METRIC_NAMES = ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR', 'ROUGE-L', 'CIDEr-D')
# the groups a caller can ask for; pycocoevalcap's method names, plus forgiving aliases
DEFAULT_METRICS = ('BLEU', 'METEOR', 'ROUGE_L', 'CIDEr')
_ALIASES = {'bleu': 'BLEU', 'meteor': 'METEOR', 'rouge_l': 'ROUGE_L', 'rouge-l': 'ROUGE_L', 'rouge': 'ROUGE_L',
            'cider': 'CIDEr', 'cider-d': 'CIDEr', 'cider_d': 'CIDEr'}

# Copied from pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after PTB tokenisation
# (tests/test_metrics.py checks the copy still matches). Note the bracket names are
# upper case but the Java tokeniser runs with -lowerCase, so '(' comes out as '-lrb-' and
# is *kept* by the COCO pipeline; ptb_tokenize reproduces that quirk on purpose.
PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"]
_DROP = frozenset(PUNCTUATIONS)

# METEOR runs a JVM that loads a 60 MB paraphrase table; give up (and report it skipped)
# if it has not answered after this long, plus a little per image
METEOR_TIMEOUT_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.02


# ---------------------------------------------------------------------------------------
# Tokenisation: a pure-Python copy of
#   java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase
# followed by pycocoevalcap's punctuation filter.
#
# PTBLexer is a JFlex scanner: at each position every rule is tried, the longest match wins
# (trailing context counts towards the length) and ties go to the earlier rule. _RULES below
# keeps that order and _scan() does the same longest-match selection. A rule's optional
# (?P<tok>...) group is the token actually emitted; the rest of its match is trailing
# context that is scanned again (JFlex's `A/B` and yypushback).
#
# Checked against the 3.4.1 jar on ~100,000 generated caption-like sentences (random
# words, contractions, numbers, abbreviations, quotes, brackets and symbols, glued
# together at random); tests/test_metrics.py repeats a small version when Java is there.
# Where it can still differ from Java:
#   * captions ending in a single letter and a period, or in "no."/"fig."/"art.": Java
#     looks at the start of the next caption (see _scan);
#   * exotic input: e-mail addresses and @names next to punctuation ("dog@,"), URLs with
#     paths, words glued to abbreviations ("inc.A"), CP1252 characters U+0080-U+009F,
#     characters outside the BMP (Java deletes them, we keep them), and Unicode
#     case-mapping corner cases of Java's toLowerCase vs str.lower.
# ---------------------------------------------------------------------------------------

# Python's \w also takes numeric symbols (superscripts, vulgar fractions, circled
# numbers) that Java's isLetter/isDigit do not: keep them out of words
_NOT_ALNUM = '\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff'
_LET = rf'[^\W\d_{_NOT_ALNUM}]'              # a letter (JFlex [:letter:])
_ALNUM = rf'[^\W_{_NOT_ALNUM}]'              # letter or digit
_APOS = "['\u2019\u0092]"                    # apostrophes that can start 's, n't ...
_APOSETC = "['`\u2019\u0092\u0091\u2018\u201b]"      # 3.4.1 also takes "a`kite" as one word
_SP = '[ \t\u00a0\u2000-\u200a\u3000]'       # PTBLexer's SPACE
_WORD = rf'{_LET}{_ALNUM}*(?:[.!?]{_LET}{_ALNUM}*)*'     # 3.4.1 keeps "skateboard.the" whole
_ACRO = r'[A-Za-z](?:\.[A-Za-z])+'
# 's 'm 'd 're 've 'll. In 3.4.1 an ASCII apostrophe followed by a letter is a quote
# instead ("'sup" -> ` sup, "x'sup" -> x ` sup) but a curly one is not ("\u2019sup" -> 's up).
_REDAUX = "(?:'(?i:[msd]|re|ve|ll)(?![A-Za-z])|[\u2019\u0092](?i:[msd]|re|ve|ll))"

# Abbreviations that keep their final period (PTBLexer's ABBREV1/ABBREV2 lists, checked
# word by word against the 3.4.1 jar). Case-insensitive ...
_ABBREV_ANYCASE = (
    'jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri '
    'ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn '
    'tenn va vt wis wisc wyo inc co cos corp rt bancorp bhd assn univ intl sys dept ph tel est ext '
    'sq ft jr sr bros blvd rd esq etc al seq bldg mr mrs ms dr drs prof profs sen sens rep reps atty '
    'attys lt col gen messrs gov govs adm rev maj sgt cpl pvt capt st ste ave pres lieut hon brig '
    'cmdr comdr pfc spc supt supts det mt adj adv asst assoc ens insp mlle mme msgr sfc vs alex wm '
    'jos cie cf treas invt elec natl').split()
# ... these only with a capital first letter (they are also ordinary words: "ill.", "wash.")
_ABBREV_CAPITAL = 'az ark del ill la mass miss ore pa tex wash'.split()
_ABBREV = ('(?:(?i:{})|{}|(?i:pp?t)[ye](?i:s)?|(?i:m)[ft](?i:g)|(?i:ed|ph)\\.(?i:d))\\.'.format(
    '|'.join(sorted(_ABBREV_ANYCASE, key=len, reverse=True)),
    '|'.join(w[0].upper() + '(?i:' + w[1:] + ')' for w in _ABBREV_CAPITAL)))

# 3.4.1 reads "b." + one of these (first letter upper case) as the end of a sentence
_SENTENCE_START = '(?:{})'.format('|'.join(w[0] + '(?i:' + w[1:] + ')' for w in (
    'About According Additionally After An A As At But Earlier He Her Here However If In It Last Many '
    'More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They '
    'This We When While What Yet You').replace('.', '\\.').split()))

_QUOTE_MAP = {'"': "''", '\u2018': '`', '\u201b': '`', '\u2039': '`', '\u0091': '`',
              '\u2019': "'", '\u203a': "'", '\u0092': "'",
              '\u201c': '``', '\u00ab': '``', '\u0093': '``', '\u201d': "''", '\u00bb': "''", '\u0094': "''"}
_BRACKETS = {'(': '-LRB-', ')': '-RRB-', '[': '-LSB-', ']': '-RSB-', '{': '-LCB-', '}': '-RCB-'}
_CURRENCY = {'\u00a2': 'cents', '\u00a3': '#', '\u0080': '$', '\u00a4': '$', '\u20a0': '$', '\u20ac': '$'}
_FRACTIONS = {'\u00bc': '1/4', '\u00bd': '1/2', '\u00be': '3/4', '\u2153': '1/3', '\u2154': '2/3'}


def _smiley(tok):
    return tok.replace('(', '-LRB-').replace(')', '-RRB-')


def _quote(tok):
    return ''.join(_QUOTE_MAP.get(c, c) for c in tok)


def _hyphens(tok):
    return '-' if len(tok) == 1 else '--'


def _nbsp(tok):
    # a token never contains a space: PTBLexer's normalizeSpace turns it into U+00A0
    return re.sub(_SP, '\u00a0', tok)


def _rules():
    """(compiled regex, output function or None) in PTBLexer's rule order."""
    assimilations = [('can', 'not'), ("'t", 'was'), ("'t", 'is'), ('gon', 'na'), ('got', 'ta'),
                     ('lem', 'me'), ('gim', 'me'), ('wan', 'na')]
    rules = [(f'(?P<tok>(?i:{head}))(?i:{tail})', None) for head, tail in assimilations]
    rules += [
        (r'<(?:[!?][A-Za-z-][^>\r\n]*|/[A-Za-z][\w:.-]*|[A-Za-z][\w:.-]*(?: +[A-Za-z][\w:.-]*'
         r'(?: *= *(?:\'[^\'\r\n]*\'|"[^"\r\n]*"|[A-Za-z][\w.:-]*))?)* */?) *>', _nbsp),  # SGML: <br>
        ('&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]', lambda t: '--'),  # SPMDASH
        ('&amp;', lambda t: '&'),                                           # SPAMP
        (rf"(?P<tok>{_WORD}){_REDAUX}", None),                              # WORD/REDAUX: dog|'s
        (rf"(?P<tok>[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*)(?i:n){_APOSETC}(?i:t)", None),  # do|n't
        (_WORD, None),                                                      # WORD
        (rf"{_APOS}(?i:n){_APOS}|'(?i:n)(?![A-Za-z])|[\u2019\u0092](?i:n)|[lLdDjJ]{_APOS}"
         rf"|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)|[A-HJ-XZn]{_APOSETC}{_LET}{{2,}}"
         rf"|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)"
         rf"|{_LET}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_LET}*|{_APOS}(?i:cause)"
         r"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", None),  # APOWORD
        (rf'(?P<tok>[yY]{_APOS})(?i:all|know)', None),                      # APOWORD2: y'|all
        (r'(?i:https?|ftp)://[^ \t\n\f\r"<>|(){}\[\]]*[^ \t\n\f\r"<>|.!?(){},;:\'\[\]-]', None),  # FULLURL
        (r'www\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}'
         r'|(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)', None),  # LIKELYURL
        (r'[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0{}]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\.)*'
         r'[^ \t\n\f\r"<>|(){}\[\].,;:\u00a0]+', None),                          # EMAIL
        (rf'@[a-zA-Z_][a-zA-Z_0-9]*|#{_LET}+', None),                       # TWITTER
        (_REDAUX, _quote),                                                  # REDAUX: 's 'll ...
        (rf"(?i:n){_APOSETC}(?i:t)(?![A-Za-z])", _quote),                   # SREDAUX: n't
        (rf'{_APOS}\d\d(?={_SP}|$)', None),                                  # TBSPEC2: '20
        (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]](?![A-Za-z0-9])", _smiley),    # SMILEY
        (r'\d{1,2}[-/]\d{1,2}[-/]\d{2,4}', None),                           # DATE
        (r'[-+]?(?:\d*(?:[.:,]\d+)+|\d+)', None),                           # NUMBER
        (rf'(?:\d{{1,4}}[- \u00a0])?\d{{1,4}}(?:\\?/|\u2044)\d{{1,4}}', _nbsp),  # FRAC: 5 1/2
        ('[\u00bc\u00bd\u00be\u2153-\u215e]', lambda t: _FRACTIONS.get(t, t)),  # FRAC2
        (_ABBREV, None),                                                    # ABBREV1, ABBREV2
        # ACRONYM: u.s. a. -- but a single letter's period is split off at a likely sentence end:
        # before a sentence-start word, and at the end of a caption (see _scan's note)
        (rf'{_ACRO}\.|[A-Za-z]\.(?!\s+{_SENTENCE_START}(?:\s|$)|\s*$)', None),
        (rf'(?P<tok>(?i:no|nos|prop|ca|figs?|art|pp|op)\.){_SP}+\d', None),  # ABBREV3: no. 5
        (rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+"
         rf"(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+)*", None),  # THING
        (r'[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+', None),                         # THINGA: AT&T
        ('(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])'
         '[0-9]{3,4}[- \u00a0]?[0-9]{3,5}', lambda t: _smiley(_nbsp(t))),       # PHONE: "747 100 100" is one!
        (r'[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}', None),  # THING3
        (rf'[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_ACRO}\.))+', None),  # HTHING
        (r'-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-', None),                          # TBSPEC
        ("''", None),
        (f"[`\u2018-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}}|{_APOS}", _quote),  # QUOTES
        ('"|&quot;', _quote),                                               # DBLQUOT
        (r'[()\[\]{}]', lambda t: _BRACKETS[t]),
        (r'<<|>>', None),                                                   # FAKEDUCKFEET
        (r'\.\.\.+|[\u0085\u2026]|\.(?:[ \u00a0]\.){2,}', lambda t: '...'),   # LDOTS
        (r'-+', _hyphens),                                                  # HYPHENS
        (r'[?!]+', None),                                                   # "?!" and "!!!" stay whole
        ('[,;:\u3001]', None),
        (r'\.', None),
        (r'[A-Z]*\$|#+|@+|_+|\*+', None),                                   # DOLSIGN, FNMARKS, ASTS
        ('[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]',
         lambda t: _CURRENCY.get(t, t)),                                    # DOLSIGN2
    ]
    return [(re.compile(pattern), out) for pattern, out in rules]


_RULES = _rules()
_SPACE_RE = re.compile('[ \t\n\r\f\v\u00a0\u2000-\u200a\u3000\u2028\u2029]+')
# the common case: a plain ASCII word followed by a space or the end
_PLAIN_RE = re.compile('[A-Za-z]+(?=[ \t\n\r]|$)')
# Most captions are plain words with maybe commas and a final period ("A dog, running.");
# those skip the scanner unless the last word could be an abbreviation ("St.", "a.").
_PLAIN_LINE_RE = re.compile(r'[ ,]*(?:[A-Za-z]+(?:[ ,]+[A-Za-z]+)*)?[ ,]*(\.?) *')
_ABBREV_RE = re.compile(_ABBREV)
_ASSIMILATED = frozenset(['cannot', 'gonna', 'gotta', 'lemme', 'gimme', 'wanna'])


def _scan(text):
    """PTB tokens of one line, before lower-casing and the punctuation filter.

    pycocoevalcap sends all captions through one Java process, one per line, and the lexer
    looks across line ends in two rare cases; we tokenise each caption alone and assume
    the next caption starts like most COCO captions do ("A ...", "The ..."):
      * a caption ending in a single letter and a period ("Vitamin C.") -> 'c' (Java keeps
        'c.' unless the next caption starts with a word of _SENTENCE_START);
      * "no." "fig." "art." ... keep their period before a number; Java also keeps it at
        the end of a caption when the next one starts with a digit.
    """
    tokens, pos, end = [], 0, len(text)
    while pos < end:
        m = _SPACE_RE.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _PLAIN_RE.match(text, pos)
        if m and m.group().lower() not in _ASSIMILATED:
            tokens.append(m.group())
            pos = m.end()
            continue
        best, best_len = None, 0
        for regex, out in _RULES:
            m = regex.match(text, pos)
            if m and m.end() - pos > best_len:          # longest match; ties keep the earlier rule
                best, best_len = (m, out), m.end() - pos
        if best is None:
            # Anything else is a one-character symbol (°, ©, +, =, %, & ...). Java deletes
            # what it cannot tokenise: control/format characters and, in 3.4.1, anything
            # outside the Basic Multilingual Plane (emoji).
            ch = text[pos]
            if not unicodedata.category(ch).startswith('C') and ord(ch) <= 0xFFFF:
                tokens.append(ch)
            pos += 1
            continue
        m, out = best
        tok = m.group('tok') if 'tok' in m.re.groupindex else m.group()
        tokens.append(out(tok) if out else tok)
        pos += len(tok)
    return tokens


@functools.lru_cache(maxsize=1 << 17)
def ptb_tokenize(text):
    """Tokenise one caption as pycocoevalcap's PTBTokenizer does, without Java.

    Lower-cases, splits off punctuation and clitics ("dog's" -> "dog 's",
    "don't" -> "do n't"), then drops pycocoevalcap's PUNCTUATIONS tokens.
    Brackets survive as '-lrb-', '-rrb-' ... exactly as in the Java pipeline.

    Args:
        text: one caption (str; other values are converted with str()).
    Returns:
        str: space-separated tokens ('' if nothing but punctuation).

    Examples::
        >>> ptb_tokenize('A dog, running.')
        'a dog running'
        >>> ptb_tokenize("The dogs' toys aren't here.")
        "the dogs toys are n't here"
    """
    text = str(text)
    m = _PLAIN_LINE_RE.fullmatch(text)
    tokens = re.findall('[A-Za-z]+', text) if m else ()
    if (not m or any(t.lower() in _ASSIMILATED for t in tokens)
            or (m.group(1) and tokens and (len(tokens[-1]) == 1 or _ABBREV_RE.fullmatch(tokens[-1] + '.')))):
        tokens = _scan(text)                            # the general case
    return ' '.join(t for t in (t.lower() for t in tokens) if t not in _DROP)


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _timed(what, verbose):
    """With verbose, a line before and after the block, with its time: the slow scorers take
    minutes on all of val2014, and a log file should not look stuck meanwhile."""
    if not verbose:
        yield
        return
    print(f'metrics: {what}...', flush=True)
    tic = time.perf_counter()
    yield
    print(f'metrics: {what}: {time.perf_counter() - tic:.1f} s', flush=True)


def _prepare(gts, res, tokenizer, verbose=False):
    """Check the inputs; return (ids, gts, res) tokenised, in pycocoevalcap's format.

    The images scored are those in ``res`` (as in COCO's evaluation); each must have
    references in ``gts``.
    """
    if not isinstance(gts, dict) or not isinstance(res, dict):
        raise TypeError(f'metrics: expected gts and res to be dicts, got {type(gts).__name__} '
                        f'and {type(res).__name__}')
    if not res:
        raise ValueError('metrics: res is empty, there are no captions to score')
    missing = [i for i in res if i not in gts]
    if missing:
        raise ValueError(f'metrics: {len(missing)} image id(s) in res have no references in gts, '
                         f'e.g. {missing[:5]}')
    ids = list(res)
    refs, cands = {}, {}
    for i in ids:
        r = gts[i]
        if isinstance(r, str) or not r:
            raise ValueError(f'metrics: gts[{i!r}] should be a non-empty list of reference captions, got {r!r}')
        c = res[i]
        if not isinstance(c, str):
            if isinstance(c, (list, tuple)) and len(c) == 1:
                c = c[0]
            else:
                raise ValueError(f'metrics: res[{i!r}] should be one caption string, got {c!r}')
        refs[i], cands[i] = [str(x) for x in r], str(c)

    if tokenizer == 'python':
        with _timed(f'tokenizing {sum(map(len, refs.values())) + len(cands)} captions', verbose):
            refs = {i: [ptb_tokenize(x) for x in r] for i, r in refs.items()}
            cands = {i: [ptb_tokenize(c)] for i, c in cands.items()}
    elif tokenizer == 'ptb':
        with _timed('tokenizing with the Java PTBTokenizer', verbose):
            refs, cands = _java_ptb_tokenize(ids, refs, cands)
    elif tokenizer is None:                             # already tokenised by the caller
        cands = {i: [c] for i, c in cands.items()}
    else:
        raise ValueError(f"metrics: tokenizer should be 'python', 'ptb' or None, got {tokenizer!r}")
    return ids, refs, cands


def _java_ptb_tokenize(ids, refs, cands):
    """pycocoevalcap's own Java PTBTokenizer (one JVM for references and candidates)."""
    if shutil.which('java') is None:
        raise RuntimeError("metrics: tokenizer='ptb' runs Stanford CoreNLP and needs Java, but java "
                           "is not on PATH; install a JRE or use tokenizer='python'")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    # The wrapper writes one caption per line and reads lines back, so anything Java treats
    # as a line break inside a caption would shift every later caption: flatten them.
    both = {('r', i): [{'caption': _SPACE_RE.sub(' ', x)} for x in refs[i]] for i in ids}
    both.update({('c', i): [{'caption': _SPACE_RE.sub(' ', cands[i])}] for i in ids})
    out = PTBTokenizer().tokenize(both)
    if any(len(out.get(k, ())) != len(v) for k, v in both.items()):
        raise RuntimeError('metrics: the Java PTBTokenizer did not return one line per caption '
                           '(see its error above); use tokenizer=\'python\'')
    return {i: out[('r', i)] for i in ids}, {i: out[('c', i)] for i in ids}


def _run_meteor(refs, cands):
    """METEOR on 0-1, or raise RuntimeError saying why it could not run."""
    if shutil.which('java') is None:
        raise RuntimeError('java not found on PATH')
    import pycocoevalcap.meteor.meteor as meteor_module
    folder = os.path.dirname(os.path.abspath(meteor_module.__file__))
    for needed in (meteor_module.METEOR_JAR, os.path.join('data', 'paraphrase-en.gz')):
        if not os.path.exists(os.path.join(folder, needed)):
            raise RuntimeError(f'{needed} is missing from {folder} (reinstall pycocoevalcap)')
    try:
        meteor = meteor_module.Meteor()                 # starts the JVM
    except OSError as e:
        raise RuntimeError(f'could not start java: {e}') from None
    proc = meteor.meteor_p
    # If the JVM hangs, kill it: the blocked readline() then returns '' and float('') fails.
    timer = threading.Timer(METEOR_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(cands), proc.kill)
    timer.start()
    try:
        score, _ = meteor.compute_score(refs, cands)
        return float(score)
    except Exception as e:                              # ValueError, BrokenPipeError ...
        why = 'timed out' if not timer.is_alive() else f'{type(e).__name__}: {e}'
        proc.kill()
        err = proc.stderr.read().decode(errors='replace').strip().splitlines()
        raise RuntimeError(f'METEOR jar failed ({why})' + (f'; java said: {err[0]}' if err else '')) from None
    finally:
        timer.cancel()
        # XXX: Meteor.__del__ takes its lock before killing the JVM, and compute_score does not
        # release it on errors, so free the lock here or garbage collection would hang forever.
        if meteor.lock.locked():
            meteor.lock.release()
        with contextlib.suppress(OSError):  # closing flushes stdin: a dead JVM gives BrokenPipeError
            proc.stdin.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _normalize_metrics(metrics):
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = []
    for m in metrics:
        name = _ALIASES.get(str(m).lower())
        if name is None:
            raise ValueError(f'metrics: unknown metric {m!r}; expected some of {DEFAULT_METRICS} '
                             '(SPICE is not supported)')
        if name not in names:
            names.append(name)
    return names


def score_captions(gts, res, metrics=DEFAULT_METRICS, tokenizer='python', verbose=False):
    """Score generated captions against references with pycocoevalcap's scorers.

    Args:
        gts: dict image id -> list of reference captions (raw strings).
        res: dict image id -> one generated caption (a str, or a 1-element list).
            The images scored are those in ``res``; ``gts`` may hold more.
        metrics: any of 'BLEU', 'METEOR', 'ROUGE_L', 'CIDEr'. Default: all four.
        tokenizer: 'python' (default): ptb_tokenize, no Java; 'ptb': pycocoevalcap's
            Java PTBTokenizer (RuntimeError if Java is missing); None: the captions
            are already tokenised (lower-case, space-separated).
        verbose: print a line on stdout before and after each stage (tokenizing, each
            scorer), with its time. Default: False

    Returns:
        (scores, skipped):
        * scores: dict metric name -> float on the 0-100 scale, names from
          'BLEU-1' 'BLEU-2' 'BLEU-3' 'BLEU-4' 'METEOR' 'ROUGE-L' 'CIDEr-D'.
        * skipped: dict metric name -> reason, for metrics asked for that could
          not run (only METEOR can be: it needs Java), e.g.
          {'METEOR': 'java not found on PATH'}.
    """
    names = _normalize_metrics(metrics)
    ids, refs, cands = _prepare(gts, res, tokenizer, verbose)
    scores, skipped = {}, {}
    for name in names:
        with _timed(f'{name} on {len(ids)} images', verbose):
            _score(name, refs, cands, scores, skipped)
    # same order whatever order the metrics were asked in
    scores = {k: scores[k] for k in METRIC_NAMES if k in scores}
    return scores, skipped


def _score(name, refs, cands, scores, skipped):
    """Run one pycocoevalcap scorer, putting its numbers into scores (or why not into skipped)."""
    if name == 'BLEU':
        from pycocoevalcap.bleu.bleu import Bleu
        bleus, _ = Bleu(4).compute_score(refs, cands, verbose=0)   # verbose=0: no 'ratio:' prints
        scores.update({f'BLEU-{n + 1}': 100.0 * float(b) for n, b in enumerate(bleus)})
    elif name == 'METEOR':
        try:
            scores['METEOR'] = 100.0 * _run_meteor(refs, cands)
        except RuntimeError as e:
            skipped['METEOR'] = str(e)
    elif name == 'ROUGE_L':
        from pycocoevalcap.rouge.rouge import Rouge
        scores['ROUGE-L'] = 100.0 * float(Rouge().compute_score(refs, cands)[0])
    elif name == 'CIDEr':
        from pycocoevalcap.cider.cider import Cider
        scores['CIDEr-D'] = 100.0 * float(Cider().compute_score(refs, cands)[0])


def bleu4(gts, res, verbose=False):
    """Corpus BLEU-4 (0-100) with the python tokenizer: the quick score for model selection.

    Same inputs as score_captions; same number as its 'BLEU-4'.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    _, refs, cands = _prepare(gts, res, 'python', verbose)
    with _timed(f'BLEU on {len(cands)} images', verbose):
        bleus, _ = Bleu(4).compute_score(refs, cands, verbose=0)
    return 100.0 * float(bleus[3])


def cider_d(gts, res, verbose=False):
    """CIDEr-D (0-100) with the python tokenizer, for model selection; same as score_captions' 'CIDEr-D'.

    Its idf comes from the references of the images scored: compare values only across
    models scored on the same images.
    """
    from pycocoevalcap.cider.cider import Cider
    _, refs, cands = _prepare(gts, res, 'python', verbose)
    with _timed(f'CIDEr on {len(cands)} images', verbose):
        return 100.0 * float(Cider().compute_score(refs, cands)[0])


def format_scores(scores, skipped=None):
    """A small text table of score_captions' output, one metric per line."""
    skipped = skipped or {}
    lines = ['metric      score   (scores x100, as in the papers)']
    for name in METRIC_NAMES:
        if name in scores:
            lines.append(f'{name:<9} {scores[name]:7.2f}')
        elif name in skipped:
            lines.append(f'{name:<9}   skipped: {skipped[name]}')
    return '\n'.join(lines)
