"""AttentionDecoder: weights that sum to 1, a shrinking batch, beam 1 = greedy, the lab's cell
against nn.LSTMCell, the feature cache's grids, the figure and gates, and an overfit check."""
import pytest
import torch
import torch.nn as nn
from PIL import Image

import attention_map
import gates
from checkpoint import build_decoder, build_encoder, load_checkpoint
from conftest import make_tiny_coco, run, torchrun_train, train_args
from data_loader import load_image
from DIY_LSTM import LSTM_LAYOUT, my_LSTMCell
from model import AttentionDecoder, DecoderRNN, EncoderCNN
from vocab import Vocabulary

E, H, V, R = 8, 16, 12, 4


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def decoder(cell=my_LSTMCell, seed=0, **kw):
    torch.manual_seed(seed)
    return AttentionDecoder(E, H, V, max_seq_length=kw.pop('max_seq_length', 10), cell=cell, **kw)


def batch(seed=1):
    """features (3, R, E), captions sorted by length (3, 5) with padding, lengths."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, R, E, generator=g)
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0], [1, 4, 2, 0, 0]])
    return features, captions, [5, 4, 3]


def test_weights_sum_to_one_at_every_step():
    features, captions, lengths = batch()
    logits, alphas = decoder().train()(features, captions, lengths, return_alphas=True)
    assert logits.shape == (sum(lengths), V) and alphas.shape == (sum(lengths), R)
    assert (alphas >= 0).all()
    torch.testing.assert_close(alphas.sum(1), torch.ones(sum(lengths)))
    ids, weights = decoder().eval().sample(features, return_alphas=True)
    ran = weights.sum(2) > 0                                    # (N, T): the steps each caption ran
    assert ran[:, 0].all()
    torch.testing.assert_close(weights.sum(2)[ran], torch.ones(int(ran.sum())))


def test_finished_captions_stop_changing_the_state():
    """Each caption's logits in the batch are its logits alone: the rows after its end (and
    whatever padding they hold) never reach it; in greedy decoding an ended caption leaves
    the batch, its later tokens <end> and its later weights 0."""
    model = decoder().eval()
    features, captions, lengths = batch()
    with torch.no_grad():
        together = model(features, captions, lengths)
        padded = captions.clone()
        padded[1, 4], padded[2, 3:] = 11, 10                     # other tokens where the captions ended
        torch.testing.assert_close(model(features, padded, lengths), together, rtol=0, atol=0)
        rows = torch.cat([torch.arange(bs) for bs in [3, 3, 3, 2, 1]])  # packed order: caption of each row
        for n, L in enumerate(lengths):
            alone = model(features[n:n + 1], captions[n:n + 1, :L], [L])
            torch.testing.assert_close(alone, together[rows == n], rtol=1e-6, atol=1e-6)
    # a model that ends every caption at once: everything after step 0 is <end> and weight 0
    model.linear.bias.data[2] = 100
    ids, weights = model.sample(features, return_alphas=True)
    assert (ids == 2).all() and (weights[:, 1:] == 0).all()


def test_beam_one_is_greedy_and_beams_run():
    model = decoder(max_seq_length=12).eval()
    features = torch.randn(5, R, E)
    greedy = [ids[:ids.index(2) + 1] if 2 in ids else ids for ids in model.sample(features).tolist()]
    assert model.beam_search(features, beam_size=1) == greedy
    assert model.generate(features, beam_size=1, max_seq_length=12) == greedy
    captions, scores = model.beam_search(features, beam_size=3, return_scores=True)
    assert len(captions) == 5 and all(1 <= len(c) <= 12 for c in captions)
    # a wider beam finds captions at least as likely as greedy's (beam 1's own scores)
    _, greedy_scores = model.beam_search(features, beam_size=1, return_scores=True)
    assert all(b >= g - 1e-5 for b, g in zip(scores, greedy_scores))
    # each image's result does not depend on the others in the batch
    assert [model.beam_search(f.unsqueeze(0), beam_size=3)[0] for f in features] == captions


def _gradients_in_lstm_layout(model):
    """Every parameter's gradient by state-dict name (the cell's per-gate ones joined as nn.LSTMCell's)."""
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith('cell.')}
    if isinstance(model.cell, my_LSTMCell):
        for name, parts in LSTM_LAYOUT.items():
            tensors = [model.cell.get_submodule(p.split('.')[0]).get_parameter(p.split('.')[1]) for p in parts
                       if getattr(model.cell, p.split('.')[0]) is not None]
            if tensors:
                grads['cell.' + name] = torch.cat([t.grad for t in tensors])
    else:
        grads.update({'cell.' + n: p.grad for n, p in model.cell.named_parameters()})
    return grads


def test_lab_cell_equals_nn_lstmcell_outputs_and_gradients():
    ours = decoder().double().train()
    theirs = decoder(cell=nn.LSTMCell, seed=5).double().train()
    theirs.load_state_dict(ours.state_dict())                 # my_LSTMCell saves nn.LSTMCell's keys
    assert isinstance(theirs.cell, nn.LSTMCell)
    features, captions, lengths = batch()
    features = features.double()
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(3)                                    # the same dropout masks
        logits, alphas = model(features, captions, lengths, return_alphas=True)
        loss = nn.functional.cross_entropy(logits, torch.randint(V, (sum(lengths),), generator=torch.Generator().manual_seed(0)))
        (loss + model.doubly_stochastic(alphas, lengths, 0.5)).backward()
        outs.append((logits.detach(), alphas.detach(), _gradients_in_lstm_layout(model)))
    (l1, a1, g1), (l2, a2, g2) = outs
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a1, a2, rtol=1e-12, atol=1e-12)
    assert g1.keys() == g2.keys() and len(g1) == len(list(theirs.parameters()))
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-10, atol=1e-12, msg=name)
    # decoding: our cell's fused one-step path against nn.LSTMCell
    ours.eval(), theirs.eval()
    f = torch.randn(4, R, E, dtype=torch.float64)
    assert ours.sample(f).tolist() == theirs.sample(f).tolist()
    assert ours.beam_search(f, beam_size=3) == theirs.beam_search(f, beam_size=3)


def test_doubly_stochastic_penalty():
    # two captions of 2 and 1 steps over 2 regions
    alphas = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])   # rows: (cap 0, t 0), (cap 1, t 0), (cap 0, t 1)
    totals = torch.tensor([[0.75, 1.25], [1.0, 0.0]])
    expected = 2.0 * ((1 - totals) ** 2).sum(1).mean()
    torch.testing.assert_close(AttentionDecoder.doubly_stochastic(alphas, [2, 1], weight=2.0), expected)


def test_bad_input_names_the_shape():
    model = decoder().eval()
    with pytest.raises(ValueError, match=r'AttentionDecoder: Expected features of shape \(N, R, E\)'):
        model(torch.randn(3, E), *batch()[1:])
    with pytest.raises(ValueError, match=r'AttentionDecoder.beam_search: Expected features of shape \(N, R, E\)'):
        model.beam_search(torch.randn(3, E))
    with pytest.raises(ValueError, match=r'DecoderRNN.beam_search: Expected features of shape \(N, E\)'):
        DecoderRNN(E, H, V, 1).beam_search(torch.randn(3, R, E))


def test_encoder_grid_and_rebuilt_decoder():
    encoder = EncoderCNN(E, grid_size=2).eval()
    with torch.no_grad():
        regions = encoder(torch.randn(2, 3, 64, 64))
        raw = encoder.extract(torch.randn(2, 3, 64, 64))
    assert regions.shape == (2, 4, E) and raw.shape == (2, 4, 2048)
    encoder.grid_size = 0
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, E)
    args = {'embed_size': E, 'hidden_size': H, 'num_layers': 1}
    assert type(build_decoder(args, V)) is DecoderRNN          # checkpoints before --decoder
    assert type(build_decoder({**args, 'decoder': 'attention', 'grid_size': 2}, V)) is AttentionDecoder


def test_gates_and_figure_of_one_picture(tmp_path):
    words = ['a', 'red', 'blue', 'square', 'circle', 'on', 'the', 'left', 'right', 'of', 'picture', '.']
    vocab = Vocabulary.from_words(words)
    model = AttentionDecoder(E, H, len(vocab), max_seq_length=8).eval()
    features = torch.randn(1, R, E)
    record = gates.record_gates(model, features)
    greedy = model.generate(features)[0]
    assert record['ids'] == greedy[:len(record['ids'])] and record['i'].shape == (len(record['ids']), H)
    assert model.cell.gate_log is None, 'the logging is switched off again'
    ids, alphas = attention_map.record_attention(model, features)
    assert ids == record['ids'][:len(ids)] and alphas.shape == (len(ids), R)
    picture = torch.randn(1, 3, 32, 32)
    out = tmp_path / 'attention.png'
    shown = attention_map.plot_attention(model, features, picture, vocab, str(out), expected_ids=greedy)
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.width >= 200
    assert 0 < len(shown) <= 8
    heat = attention_map.smooth_map(torch.tensor([0.7, 0.1, 0.1, 0.1]), 32)
    assert heat.shape == (32, 32) and float(heat.max()) == pytest.approx(1.0)
    assert heat[:16, :16].mean() > heat[16:, 16:].mean(), 'the top-left region is the bright one'
    with pytest.raises(ValueError, match='no attention'):
        attention_map.record_attention(DecoderRNN(E, H, len(vocab), 1), torch.randn(1, E))


def test_overfits_a_few_pictures():
    """Four pictures, each with its own caption: the encoder's head and the decoder learn them
    all by heart, greedy and beam search alike."""
    encoder = build_encoder(E, {'source': 'none', 'seed': 0})
    encoder.grid_size = 2
    colours = ['red', 'green', 'blue', 'white']
    pictures = torch.stack([torch.zeros(3, 64, 64) for _ in colours])
    for k in range(4):
        pictures[k, k % 3, (k // 2) * 32:(k // 2) * 32 + 32, (k % 2) * 32:(k % 2) * 32 + 32] = 3.0
    with torch.no_grad():
        raw = encoder.extract(pictures)                            # (4, 4, 2048): the frozen part once
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 9, 2, 0, 0], [1, 10, 11, 2, 0]])
    order = [0, 1, 3, 2]                                           # sorted by length, longest first
    captions, raw, lengths = captions[order], raw[order], [5, 4, 4, 3]
    torch.manual_seed(0)
    model = AttentionDecoder(E, 32, V, max_seq_length=8, dropout=0.0)
    params = list(model.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params, lr=0.02)
    targets = nn.utils.rnn.pack_padded_sequence(captions, lengths, batch_first=True).data
    encoder.train(), model.train()
    for _ in range(150):
        logits, alphas = model(encoder.project(raw), captions, lengths, return_alphas=True)
        loss = nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        (loss + model.doubly_stochastic(alphas, lengths, 0.01)).backward()
        optimizer.step()
    assert loss.item() < 0.05
    with torch.no_grad():  # bn's running statistics as train.py --recalibrate_bn sets them (momentum 0.01 is slow)
        encoder.bn.reset_running_stats()
        encoder.bn.momentum = None
        encoder.project(raw)
        encoder.eval(), model.eval()
        features = encoder.project(raw)
        expected = [c[:n].tolist() for c, n in zip(captions, lengths)]
        assert model.generate(features, beam_size=1, max_seq_length=8) == expected
        assert model.generate(features, beam_size=3) == expected


def test_train_py_refuses_bad_attention_flags(tiny_coco, tiny_vocab, tmp_path):
    for flags, says in ((['--grid_size', 3], '--grid_size must be from 1 to 1'),
                        (['--num_layers', 2, '--grid_size', 1], '--num_layers must be 1'),
                        (['--attention_penalty', -1, '--grid_size', 1], '--attention_penalty must be 0 or more')):
        proc = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path, '--decoder', 'attention', *flags),
                   check=False)
        assert proc.returncode == 2 and says in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()[-1]) > 0


def test_feature_cache_keeps_grids_apart(tmp_path):
    from feature_cache import FeatureCache, FeatureDataset
    image_dir, json = make_tiny_coco(str(tmp_path / 'coco'), n_images=3, size=64)
    vocab = Vocabulary.from_words(['a', 'square'])
    encoder = build_encoder(E, {'source': 'none', 'seed': 0}).eval()
    caches = {}
    for grid in (0, 2, 1):
        encoder.grid_size = grid
        cache = FeatureCache(root=image_dir, json=json, crop_size=64, encoder_id='random:seed=0',
                             cache_dir=str(tmp_path / 'features'))
        features = cache.load_or_build(encoder)
        caches[grid] = cache.path
        item, _ = FeatureDataset(cache, vocab, train=False)[0]
        assert item.shape == ((2048,) if grid == 0 else (grid * grid, 2048))
        with torch.no_grad():
            picture = load_image(cache.paths()[0], 64, 64)
            torch.testing.assert_close(torch.from_numpy(features[0, 0].copy()).view(item.shape),
                                       encoder.extract(picture)[0], rtol=1e-5, atol=1e-5)
    assert len(set(caches.values())) == 3, 'pooled, 2 x 2 and 1 x 1 caches have names of their own'


ATTENTION = ['--decoder', 'attention', '--crop_size', 48, '--grid_size', 2]  # train_args' 48-pixel pictures


def test_resume_continues_exactly(tiny_coco, tiny_vocab, tmp_path):
    """Stopped after 7 steps and resumed, an attention run (dropout and all) ends with the same
    weights as one never stopped."""
    common = ['--num_epochs', 2, '--batch_size', 4, '--learning_rate', 0.01, *ATTENTION]
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'a', *common))
    run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'b', *common, '--max_steps', 7))
    out = run('train.py', *train_args(tiny_coco, tiny_vocab, tmp_path / 'b', *common,
                                      '--resume', tmp_path / 'b' / 'latest.pt')).stdout
    assert 'epoch 1, step 2' in out
    a, b = load_checkpoint(tmp_path / 'a' / 'latest.pt'), load_checkpoint(tmp_path / 'b' / 'latest.pt')
    assert b['args']['decoder'] == 'attention' and a['global_step'] == b['global_step'] == 10
    for part in ('encoder', 'decoder'):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f'{part}.{key} differs after resume'


def test_two_processes_ddp_gloo(tiny_coco, tiny_vocab, tmp_path):
    """torchrun with 2 CPU processes: the penalty's gradient reaches both, which end alike."""
    args = train_args(tiny_coco, tiny_vocab, tmp_path / 'models', '--num_epochs', 1, '--batch_size', 2,
                      '--device', 'cpu', *ATTENTION)
    _, (rank0, rank1) = torchrun_train(tmp_path, args)
    assert any(k.startswith('decoder.att') for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f'{name} differs between the ranks'
