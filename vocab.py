"""The vocabulary (words <-> ids) and the tokenizer every script shares.

    vocab = load_vocab('data/vocab.pkl')   # made by build_vocab.py
    vocab('dog')          # -> its id, e.g. 57
    vocab('zyzzyva')      # -> 3, the id of <unk>: a word never seen in training
    vocab.idx2word[57]    # -> 'dog'

Ids 0-3 are always the special tokens, in the tutorial's order:
<pad> = 0 (fills short captions in a batch), <start> = 1, <end> = 2, <unk> = 3.
"""
import copyreg
import os
import pickle

from nltk.tokenize import word_tokenize

from utils import atomic_write

SPECIAL_TOKENS = ('<pad>', '<start>', '<end>', '<unk>')


def tokenize(text):
    """'A dog, running.' -> ['a', 'dog', ',', 'running', '.']

    The tutorial's tokenizer (nltk's word_tokenize on the lower-cased caption) with
    preserve_line=True, which skips the punkt sentence splitter and so needs no nltk
    data download. The one difference: a full stop in the middle of a two-sentence
    caption stays on its word ('dog. a cat' -> 'dog.', 'a', 'cat').
    """
    return word_tokenize(str(text).lower(), preserve_line=True)


class Vocabulary:
    """Simple vocabulary wrapper: the tutorial's class, with its attribute names,
    so that vocab.pkl files pickled by the tutorial's build_vocab.py still load.

    Attributes:
        word2idx: dict str -> int
        idx2word: dict int -> str
        idx: the id the next new word gets (= len(self))

    Examples::

        >>> vocab = Vocabulary.from_words(['a', 'dog'])
        >>> vocab('dog'), vocab('cat'), len(vocab)
        (5, 3, 6)
        >>> vocab.words()
        ['<pad>', '<start>', '<end>', '<unk>', 'a', 'dog']
    """

    def __init__(self):
        # empty on purpose, as in the tutorial: build() and from_words() add the special tokens
        self.word2idx = {}
        self.idx2word = {}
        self.idx = 0

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        if word not in self.word2idx:
            return self.word2idx['<unk>']
        return self.word2idx[word]

    def __len__(self):
        return len(self.word2idx)

    def __repr__(self):
        return f'Vocabulary({len(self)} words)'

    def words(self):
        """idx2word as a list in id order: what a checkpoint stores, and from_words() reads."""
        return [self.idx2word[i] for i in range(len(self))]

    def decode(self, ids, markers=True):
        """Token ids -> text, cut after the first <end>.

        markers=True keeps <start> and <end>, the tutorial's sample.py format:
        '<start> a dog runs . <end>'. markers=False drops <pad>, <start> and <end>, what
        caption metrics compare: 'a dog runs .' (<unk> stays: an unknown word still costs
        its n-grams).
        """
        words = []
        for i in ids:
            word = self.idx2word[int(i)]
            if markers or word not in SPECIAL_TOKENS[:3]:
                words.append(word)
            if word == '<end>':
                break
        return ' '.join(words)

    @classmethod
    def from_words(cls, words):
        """The vocabulary whose ids are the positions in words, so from_words(v.words()) == v.

        The special tokens are put in front when words does not start with them.
        """
        words = list(words)
        if tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            words = list(SPECIAL_TOKENS) + words
        vocab = cls()
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f'Vocabulary: expected words to be str, got {type(word).__name__} {word!r}')
            vocab.add_word(word)
        if len(vocab) != len(words):  # a repeated word would shift every id after it
            raise ValueError(f'Vocabulary: expected {len(words)} different words, got {len(vocab)} '
                             f'(some appear twice, or a special token appears after the first four)')
        return vocab

    @classmethod
    def build(cls, counts, threshold):
        """Special tokens, then every word counted at least threshold times.

        counts: {word: count}, e.g. a collections.Counter of tokens. The tutorial kept
        the Counter's order; sorting (most frequent first, ties alphabetical) gives the
        same ids on every run and Python version.
        """
        kept = [w for w, n in counts.items() if n >= threshold and w not in SPECIAL_TOKENS]
        return cls.from_words(sorted(kept, key=lambda w: (-counts[w], w)))


def save_vocab(vocab, path):
    """Pickle vocab to path, atomically: an interrupted save leaves the old file, never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        pickle.dump(vocab, f, protocol=4)  # protocol 4: readable by every Python 3 still in use


# What a vocabulary pickle may name besides the Vocabulary class itself: protocols 0
# and 1 (and Python 2) rebuild a plain object through copyreg._reconstructor(cls, object, None).
_PLAIN_OBJECT = {
    ('copyreg', '_reconstructor'): copyreg._reconstructor,
    ('copy_reg', '_reconstructor'): copyreg._reconstructor,  # Python 2's name for copyreg
    ('builtins', 'object'): object,
    ('__builtin__', 'object'): object,
}


class _VocabUnpickler(pickle.Unpickler):
    """An Unpickler that can make a Vocabulary and builtin containers, and nothing else.

    pickle.load calls whatever the file names, so a crafted .pkl can run os.system on
    load. Every callable a pickle uses is looked up through find_class, so refusing all
    but the names above makes loading safe:
    https://docs.python.org/3/library/pickle.html#restricting-globals
    """

    def find_class(self, module, name):
        # The tutorial's vocab.pkl names __main__.Vocabulary (build_vocab.py was run as a
        # script), which plain pickle.load finds only where __main__ has a Vocabulary.
        # Any module's Vocabulary means this one: same attributes, and nothing is imported.
        if name == 'Vocabulary':
            return Vocabulary
        if (module, name) in _PLAIN_OBJECT:
            return _PLAIN_OBJECT[module, name]
        raise pickle.UnpicklingError(f'it asks to load {module}.{name}, and a vocabulary holds only words '
                                     f'(refused, nothing was run)')


def load_vocab(path):
    """Read a vocab.pkl made by build_vocab.py, or by the tutorial's build_vocab.py.

    Raises FileNotFoundError when path is missing, and ValueError when the file is not a
    valid vocabulary (including any pickle that names anything but a Vocabulary).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: make it with `python build_vocab.py --vocab_path {path}`')
    with open(path, 'rb') as f:
        try:
            # utf-8: a Python 2 pickle stores words as bytes
            loaded = _VocabUnpickler(f, encoding='utf-8').load()
        except Exception as e:  # a damaged or foreign file can fail in many ways; all mean the same to the user
            raise ValueError(f'{path} is not a vocabulary made by build_vocab.py: {e}') from None
    problem = _check(loaded)
    if problem:
        raise ValueError(f'{path} is not a vocabulary made by build_vocab.py: {problem}')
    # a fresh object: drops any extra attributes the file may have carried
    return Vocabulary.from_words(loaded.words())


def _check(vocab):
    """What is wrong with an unpickled vocabulary, or None when it is consistent."""
    if not isinstance(vocab, Vocabulary):
        return f'it holds a {type(vocab).__name__}, expected a Vocabulary'
    word2idx, idx2word = getattr(vocab, 'word2idx', None), getattr(vocab, 'idx2word', None)
    if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
        return 'word2idx and idx2word must be dicts'
    if not all(type(w) is str and type(i) is int for w, i in word2idx.items()):
        return 'word2idx must map str to int'
    if idx2word != {i: w for w, i in word2idx.items()}:
        return 'idx2word is not the inverse of word2idx'
    if sorted(idx2word) != list(range(len(idx2word))):
        return f'the ids are not 0..{len(idx2word) - 1}'
    if getattr(vocab, 'idx', None) != len(word2idx):
        return f'idx is {getattr(vocab, "idx", None)!r}, expected {len(word2idx)} (the number of words)'
    specials = tuple(idx2word.get(i) for i in range(len(SPECIAL_TOKENS)))
    if specials != SPECIAL_TOKENS:
        return f'ids 0-3 must be {", ".join(SPECIAL_TOKENS)}, got {specials}'
    return None
