"""DecoderRNN.beam_search: greedy at beam size 1, exact against an exhaustive search, batched."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from model import DecoderRNN

END = 2  # vocab.py's id of <end>
pytestmark = pytest.mark.usefixtures('one_thread')


def random_decoder(seed, vocab_size, embed_size=6, hidden_size=8, num_layers=1, max_seq_length=20,
                   dtype=torch.float64):
    """A decoder with large random weights: peaked, varied next-token distributions, so
    captions differ between images and <end> comes early in some and late in others."""
    torch.manual_seed(seed)
    decoder = DecoderRNN(embed_size, hidden_size, vocab_size, num_layers, max_seq_length).to(dtype).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            nn.init.normal_(p, std=1.0)
    return decoder


def cut_after_end(ids):
    return ids[:ids.index(END) + 1] if END in ids else ids


def teacher_forced_log_p(decoder, feature, sequences):
    """log p of each sequence under the model, by DecoderRNN.forward (teacher forcing).

    feature (E,), sequences: list of equal-length token lists -> (M,) tensor
    """
    captions = torch.tensor(sequences)                               # (M, L)
    M, L = captions.shape
    logits = decoder(feature.expand(M, -1), captions, [L] * M)      # (M*L, V), packed: time-major
    targets = pack_padded_sequence(captions, [L] * M, batch_first=True).data  # (M*L,)
    log_p = logits.log_softmax(1).gather(1, targets.unsqueeze(1))   # (M*L, 1)
    return log_p.view(L, M).sum(0)                                   # (M,)


def all_sequences(vocab_size, max_seq_length):
    """Every caption the decoder can produce in max_seq_length steps: any tokens, stopping at
    the first <end> or after max_seq_length tokens."""
    others = [v for v in range(vocab_size) if v != END]
    for length in range(1, max_seq_length + 1):
        for head in itertools.product(others, repeat=length - 1):
            yield list(head) + [END]
    yield from (list(s) for s in itertools.product(others, repeat=max_seq_length))


@pytest.mark.parametrize('num_layers', [1, 2])
def test_beam_size_1_is_sample_token_for_token(num_layers):
    ended = unended = 0
    for seed in range(5):
        decoder = random_decoder(seed, vocab_size=12, num_layers=num_layers, max_seq_length=10, dtype=torch.float32)
        features = torch.randn(8, 6)
        greedy = [cut_after_end(ids) for ids in decoder.sample(features).tolist()]
        assert decoder.beam_search(features, beam_size=1) == greedy
        # and with a shorter max_seq_length: sample()'s first tokens
        short = [cut_after_end(ids[:4]) for ids in decoder.sample(features).tolist()]
        assert decoder.beam_search(features, beam_size=1, max_seq_length=4, length_penalty=1.0) == short
        ended += sum(END in ids for ids in greedy)
        unended += sum(END not in ids for ids in greedy)
    assert ended and unended, 'the random decoders should give both kinds of caption'


@pytest.mark.parametrize('vocab_size,max_seq_length', [(4, 3), (5, 4)])
def test_a_full_width_beam_finds_the_exhaustive_optimum(vocab_size, max_seq_length):
    sequences = [tuple(s) for s in all_sequences(vocab_size, max_seq_length)]
    full = len(sequences)  # wider than the beam ever needs to be: nothing is ever pruned
    by_length = {}
    for s in sequences:
        by_length.setdefault(len(s), []).append(s)
    beam_beats_greedy = penalty_matters = short_optimum = 0
    for seed in range(4):
        decoder = random_decoder(seed, vocab_size)
        features = torch.randn(6, 6, dtype=torch.float64)
        log_p = []  # per image: {sequence: log p}
        for feature in features:
            log_p.append({})
            for group in by_length.values():
                log_p[-1].update(zip(group, teacher_forced_log_p(decoder, feature, group).tolist()))
            assert math.isclose(sum(math.exp(v) for v in log_p[-1].values()), 1.0, rel_tol=1e-9), \
                'the enumeration covers every caption exactly once'
        for alpha in (0.0, 0.5, 1.0, 2.0):
            rank = lambda n, s: log_p[n][s] / len(s) ** alpha
            optima = [max(lp, key=lambda s: rank(n, s)) for n, lp in enumerate(log_p)]
            caps, scores = decoder.beam_search(features, beam_size=full, max_seq_length=max_seq_length,
                                               length_penalty=alpha, return_scores=True)
            assert [tuple(c) for c in caps] == optima, f'seed {seed} alpha {alpha}'
            assert scores == pytest.approx([log_p[n][s] for n, s in enumerate(optima)], rel=1e-9, abs=1e-9)
            # narrower beams: some caption the model can produce, scored as the model scores it
            for k in (1, 2, 3):
                caps, scores = decoder.beam_search(features, beam_size=k, max_seq_length=max_seq_length,
                                                   length_penalty=alpha, return_scores=True)
                for n, (cap, score) in enumerate(zip(map(tuple, caps), scores)):
                    assert cap in log_p[n]
                    assert math.isclose(score, log_p[n][cap], rel_tol=1e-9, abs_tol=1e-9)
                    assert rank(n, cap) <= rank(n, optima[n]) + 1e-12
                    beam_beats_greedy += k == 1 and cap != optima[n]
            if alpha == 0.0:
                plain = optima
                short_optimum += sum(len(s) < max_seq_length for s in optima)
        penalty_matters += sum(a != b for a, b in zip(plain, optima))  # alpha 0 against alpha 2
    # the cases above must include the interesting ones, or the test checks little
    assert beam_beats_greedy and penalty_matters and short_optimum, (beam_beats_greedy, penalty_matters, short_optimum)


def test_batched_over_images_equals_one_image_at_a_time():
    decoder = random_decoder(7, vocab_size=9, num_layers=2, max_seq_length=8)
    features = torch.randn(5, 6, dtype=torch.float64)
    for k, alpha in ((2, 0.0), (4, 0.7), (6, 1.0)):
        together = decoder.beam_search(features, beam_size=k, length_penalty=alpha, return_scores=True)
        alone = [decoder.beam_search(f.unsqueeze(0), beam_size=k, length_penalty=alpha, return_scores=True)
                 for f in features]
        assert together[0] == [a[0][0] for a in alone]
        assert together[1] == pytest.approx([a[1][0] for a in alone], rel=1e-12)


def test_output_format_and_float32():
    decoder = random_decoder(3, vocab_size=10, max_seq_length=7, dtype=torch.float32)
    captions = decoder.beam_search(torch.randn(4, 6), beam_size=3)
    assert len(captions) == 4
    for ids in captions:
        assert all(type(i) is int for i in ids)
        assert 1 <= len(ids) <= 7
        assert END not in ids[:-1], 'nothing after <end>'
        assert ids[-1] == END or len(ids) == 7


def test_bad_arguments_raise():
    decoder = random_decoder(0, vocab_size=6)
    with pytest.raises(ValueError, match='beam_size'):
        decoder.beam_search(torch.randn(2, 6, dtype=torch.float64), beam_size=0)
    with pytest.raises(ValueError, match="max_seq_length"):
        decoder.beam_search(torch.randn(2, 6, dtype=torch.float64), max_seq_length=0)
    with pytest.raises(ValueError, match=r'\(N, E\)'):
        decoder.beam_search(torch.randn(6, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_the_gpu_same_as_cpu():
    decoder = random_decoder(1, vocab_size=9, max_seq_length=8)
    features = torch.randn(5, 6, dtype=torch.float64)
    cpu = decoder.beam_search(features, beam_size=4, length_penalty=0.5)
    gpu = decoder.cuda().beam_search(features.cuda(), beam_size=4, length_penalty=0.5)
    assert gpu == cpu
