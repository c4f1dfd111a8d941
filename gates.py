"""The LSTM's gates at work: record them while the decoder writes one caption, and draw them.

    $ python sample.py --image png/example.png --gates gates.png

`record_gates` runs the decoder's own greedy decoding (DecoderRNN.generate with beam size 1,
which gives the tokens sample.py prints) on my_LSTM's plain path, where each my_LSTMCell step
appends its gates to the cell's ``gate_log`` (AttentionDecoder steps its one my_LSTMCell
itself, and takes the plain path whenever the cell logs); `plot_gates` draws one PNG from that run: the
input, forget and output gates' mean activation at each generated word, and a heatmap of the
memory cells that change most over the words. The normal decoding path is left as it is: the
flags are set for this one run and restored after it.
"""
import warnings

import torch

from utils import atomic_write

GATE_LABELS = {'i': 'input gate i (how much new content is written)',
               'f': 'forget gate f (how much memory is kept)',
               'o': 'output gate o (how much memory is shown in h)'}


def record_gates(decoder, features, max_seq_length=None, layer=-1):
    """Caption one picture greedily and record one LSTM layer's gates at every step.

    Step t reads the previous word (the image feature at step 0) and writes word t, so row t
    of each tensor belongs to the t-th generated token.

    Args:
        decoder: a DecoderRNN whose lstm is a my_LSTM, or an AttentionDecoder on a my_LSTMCell
        features: (1, E), or (1, R, E) for AttentionDecoder, from EncoderCNN
        max_seq_length: tokens generated at most. Default: None (the decoder's own, as sample())
        layer: which layer's cell to record (-1: the top one, which feeds the words). Default: -1

    Returns: a dict with
        * ids: list of T ints, the generated tokens (normally '<start> ... <end>' and on)
        * i, f, g, o: (T, H) the gates of that layer at each step
        * c: (T, H) the memory (cell state) after each step; h: (T, H_out) the hidden state

    where: T = generated tokens (max_seq_length, or fewer when beam search stops at <end>)
    """
    lstm, cell = recorded_cell(decoder, layer)
    if features.dim() not in (2, 3) or features.size(0) != 1:
        raise ValueError(f"gates: Expected features of one picture, shape (1, E) or (1, R, E), "
                         f"got {tuple(features.shape)}")
    log, old_log = [], cell.gate_log
    fused = lstm.fused if lstm is not None else None
    try:
        if lstm is not None:
            lstm.fused = False  # the plain path: my_LSTMCell step by step, which logs
        cell.gate_log = log     # (AttentionDecoder takes the plain path whenever its cell logs)
        ids = decoder.generate(features, beam_size=1, max_seq_length=max_seq_length)[0]
    finally:
        if lstm is not None:
            lstm.fused = fused
        cell.gate_log = old_log
    # AttentionDecoder's greedy decoding stops at <end> and pads after it: those steps never ran
    ids = [int(i) for i in ids][:len(log)]
    record = {k: torch.cat([step[k] for step in log[:len(ids)]]).float().cpu() for k in 'ifgoch'}  # (T, .)
    record['ids'] = ids
    return record


def recorded_cell(decoder, layer=-1):
    """(my_LSTM or None, the my_LSTMCell whose gates to record): DecoderRNN's layer `layer`,
    or AttentionDecoder's one cell (no my_LSTM around it)."""
    lstm = getattr(decoder, 'lstm', None)
    if lstm is None and hasattr(getattr(decoder, 'cell', None), 'gate_log'):
        return None, decoder.cell
    if not (hasattr(lstm, 'cells') and hasattr(lstm, 'fused')):
        name = type(lstm if lstm is not None else getattr(decoder, 'cell', None)).__name__
        raise ValueError(f"gates: the decoder's LSTM is a {name}; only my_LSTM's cells record their gates")
    return lstm, lstm.cells[f'l{range(lstm.num_layers)[layer]}']


def caption_words(ids, vocab):
    """The generated tokens as words, up to and including the first <end>."""
    words = []
    for i in ids:
        words.append(vocab.idx2word[int(i)])
        if words[-1] == '<end>':
            break
    return words


def gate_summary(record, steps, cells=24):
    """What the plot shows, for the first `steps` words of a record (see record_gates).

    Returns a dict with
        * means: {'i', 'f', 'o'}: (T,) each gate's mean activation over the H cells, per word
        * cell_ids: LongTensor (K,) the K cells whose memory varies most over the words (by
          standard deviation), in index order
        * cells: (K, T) their memory c at each word

    where: T = steps, K = min(cells, H)
    """
    means = {k: record[k][:steps].mean(1) for k in 'ifo'}                 # (T,) each
    c = record['c'][:steps]                                                 # (T, H)
    k = min(cells, c.size(1))
    cell_ids = c.std(0, unbiased=False).topk(k).indices.sort().values       # (K,)
    return {'means': means, 'cell_ids': cell_ids, 'cells': c[:, cell_ids].T}  # cells: (K, T)


def gate_figure(summary, words, caption, layer_name='', hidden_size=None, lstm_name='my_LSTM'):
    """A matplotlib Figure (no pyplot, no display needed) of a gate_summary over the words."""
    from matplotlib.figure import Figure

    T = len(words)
    fig = Figure(figsize=(max(7.0, 0.62 * T + 2.5), 7.5), layout='constrained')
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.25])
    steps = range(T)
    for k, colour in zip('ifo', ('tab:blue', 'tab:orange', 'tab:green')):
        top.plot(steps, summary['means'][k].numpy(), marker='o', color=colour, label=GATE_LABELS[k])
    top.set_ylim(0, 1)
    top.set_ylabel('mean activation over the cells')
    top.grid(True, alpha=0.3)
    top.legend(loc='lower left', fontsize=8, framealpha=0.85)
    cells = summary['cells'].numpy()
    m = float(abs(cells).max()) or 1.0
    image = bottom.imshow(cells, aspect='auto', cmap='RdBu_r', vmin=-m, vmax=m, interpolation='nearest')
    ids = summary['cell_ids'].tolist()
    bottom.set_yticks(range(len(ids)), [str(i) for i in ids], fontsize=7)
    bottom.set_ylabel(f'memory cell (the {len(ids)} that vary most'
                      + (f' of {hidden_size})' if hidden_size else ')'))
    fig.colorbar(image, ax=bottom, label='memory c (cell state)', pad=0.01)
    bottom.set_xticks(steps, words, rotation=45, ha='right', rotation_mode='anchor')
    bottom.set_xlabel('the word written at each step (each step reads the one before; the first reads the picture)')
    fig.suptitle(f'"{caption}"\n{lstm_name}{" " + layer_name if layer_name else ""}: gates and memory while it '
                 'writes each word', fontsize=11)
    return fig


def plot_gates(decoder, features, vocab, path, max_seq_length=None, layer=-1, cells=24, expected_ids=None):
    """Record the gates of one picture's greedy caption and write their plot to `path` (PNG,
    atomically). expected_ids: the tokens the caller printed (its own decoding run); a warning
    says so if the recorded run wrote other ones. Returns the caption's words."""
    record = record_gates(decoder, features, max_seq_length=max_seq_length, layer=layer)
    if expected_ids is not None and [int(i) for i in expected_ids][:len(record['ids'])] != record['ids']:
        warnings.warn('gates: the recorded decoding wrote another caption than the one printed '
                      '(a near-tie between two words, rounded differently on the plain path)')
    words = caption_words(record['ids'], vocab)
    summary = gate_summary(record, len(words), cells=cells)
    caption = ' '.join(w for w in words if w not in ('<start>', '<end>'))
    num_layers = decoder.lstm.num_layers if hasattr(decoder, 'lstm') else 1
    name = f'layer {range(num_layers)[layer]}' if num_layers > 1 else ''
    lstm_name = 'my_LSTM' if hasattr(decoder, 'lstm') else 'AttentionDecoder\'s my_LSTMCell'
    fig = gate_figure(summary, words, caption, name, hidden_size=record['c'].size(1), lstm_name=lstm_name)
    with atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=110)
    return words
