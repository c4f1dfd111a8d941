"""gates.py: the gates it plots are my_LSTMCell's, step by step, on the caption sample() writes."""
import os

import pytest
import torch
from PIL import Image

import gates
from model import DecoderRNN
from vocab import Vocabulary

WORDS = ['a', 'red', 'blue', 'square', 'circle', 'on', 'the', 'left', 'right', 'of', 'picture', '.']


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    return DecoderRNN(8, 16, len(WORDS) + 4, num_layers=1, max_seq_length=12).eval()


@pytest.fixture
def vocab():
    return Vocabulary.from_words(WORDS)


def manual_run(decoder, features, ids):
    """The LSTM step by step from the cell's own Linear layers, fed the given tokens: per step
    (i, f, g, o, c, h) of shape (H,), and the token the decoder's linear layer picks."""
    cell = decoder.lstm.cells['l0']
    x = features                                                         # (1, E)
    h = c = torch.zeros(1, cell.hidden_size)
    steps = []
    with torch.no_grad():
        for token in ids:
            i = torch.sigmoid(cell.fc_ii(x) + cell.fc_hi(h))
            f = torch.sigmoid(cell.fc_if(x) + cell.fc_hf(h))
            g = torch.tanh(cell.fc_ig(x) + cell.fc_hg(h))
            o = torch.sigmoid(cell.fc_io(x) + cell.fc_ho(h))
            c = f * c + i * g
            h = o * torch.tanh(c)
            steps.append(dict(i=i[0], f=f[0], g=g[0], o=o[0], c=c[0], h=h[0],
                              pick=decoder.linear(h).argmax(1).item()))
            x = decoder.embed(torch.tensor([token]))                     # (1, E): this step's word
    return steps


def test_recorded_gates_are_the_cells_on_samples_caption(decoder):
    features = torch.randn(1, 8)
    fused_ids = decoder.sample(features)[0].tolist()  # what sample.py prints: the fused path
    record = gates.record_gates(decoder, features)
    assert record['ids'] == fused_ids
    steps = manual_run(decoder, features, record['ids'])
    assert [s['pick'] for s in steps] == record['ids']  # the manual run decodes the same words
    for k in 'ifgoch':
        want = torch.stack([s[k] for s in steps])                        # (T, H)
        assert record[k].shape == want.shape
        assert torch.allclose(record[k], want, atol=1e-6), k
    # the normal path is back as it was
    assert decoder.lstm.fused is True and decoder.lstm.cells['l0'].gate_log is None


def test_plot_data_match_the_manual_run(decoder, vocab):
    features = torch.randn(1, 8)
    record = gates.record_gates(decoder, features)
    words = gates.caption_words(record['ids'], vocab)
    steps = manual_run(decoder, features, record['ids'])[:len(words)]
    summary = gates.gate_summary(record, len(words), cells=5)
    for k in 'ifo':
        want = torch.stack([s[k].mean() for s in steps])
        assert torch.allclose(summary['means'][k], want, atol=1e-6), k
    c = torch.stack([s['c'] for s in steps])                             # (T, H)
    spread = c.std(0, unbiased=False)
    assert summary['cell_ids'].tolist() == sorted(spread.topk(5).indices.tolist())
    assert torch.allclose(summary['cells'], c[:, summary['cell_ids']].T, atol=1e-6)


def test_png_is_written_atomically(decoder, vocab, tmp_path):
    features = torch.randn(1, 8)
    path = tmp_path / 'gates.png'
    words = gates.plot_gates(decoder, features, vocab, str(path), expected_ids=decoder.sample(features)[0].tolist())
    assert words == gates.caption_words(decoder.sample(features)[0].tolist(), vocab)
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.width > 600 and image.height > 600
        image.verify()
    assert os.listdir(tmp_path) == ['gates.png']  # no temporary file left


def test_flags_restored_when_decoding_fails(decoder, monkeypatch):
    def broken(*args, **kwargs):
        assert decoder.lstm.fused is False
        raise RuntimeError('boom')
    monkeypatch.setattr(decoder, 'generate', broken)
    with pytest.raises(RuntimeError, match='boom'):
        gates.record_gates(decoder, torch.randn(1, 8))
    assert decoder.lstm.fused is True and decoder.lstm.cells['l0'].gate_log is None


def test_top_layer_and_max_seq_length():
    torch.manual_seed(1)
    decoder = DecoderRNN(8, 16, 10, num_layers=2).eval()
    features = torch.randn(1, 8)
    record = gates.record_gates(decoder, features, max_seq_length=6)
    assert record['ids'] == decoder.generate(features, beam_size=1, max_seq_length=6)[0]
    # the top layer's h is what the decoder's linear layer reads
    picks = decoder.linear(record['h']).argmax(1).tolist()
    assert picks == record['ids']


def test_bad_input(decoder):
    with pytest.raises(ValueError, match=r'shape \(1, E\)'):
        gates.record_gates(decoder, torch.randn(2, 8))
    decoder.lstm = torch.nn.LSTM(8, 16, batch_first=True)
    with pytest.raises(ValueError, match="only my_LSTM's cells"):
        gates.record_gates(decoder, torch.randn(1, 8))
