"""nn.LSTM's and nn.LSTMCell's checks of arguments and inputs, for DIY_LSTM.py's my_LSTM and my_LSTMCell.

The same checks, in the same order, with nn.LSTM's exception types and messages (prefixed
with our class name), so that my_LSTM fails where nn.LSTM fails, and the same way
(tests/test_lstm_parity.py runs PyTorch's own error inputs against both). They are kept
apart from DIY_LSTM.py because they teach nothing about the LSTM.
"""
import numbers
import warnings

import torch


def check_types(cls, kind, **values):
    for name, value in values.items():
        if not isinstance(value, kind):
            raise TypeError(f"{cls}: {name} should be of type {kind.__name__}, got: {type(value).__name__}")


def check_sizes(cls, input_size, hidden_size, proj_size):
    check_types(cls, int, input_size=input_size, hidden_size=hidden_size, proj_size=proj_size)
    if input_size <= 0 or hidden_size <= 0:
        raise ValueError(f"{cls}: input_size and hidden_size must be greater than zero, "
                         f"got input_size={input_size}, hidden_size={hidden_size}")
    if proj_size < 0:
        raise ValueError(f"{cls}: proj_size should be a positive integer or zero to disable projections, got {proj_size}")
    if proj_size >= hidden_size:
        raise ValueError(f"{cls}: proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                         f"and hidden_size={hidden_size}")


def check_lstm_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size):
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError("my_LSTM: dropout should be a number in range [0, 1] representing the "
                         f"probability of an element being zeroed, got {dropout!r}")
    if dropout > 0 and num_layers == 1:
        warnings.warn("my_LSTM: dropout option adds dropout after all but last recurrent layer, so non-zero "
                      f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                      f"num_layers={num_layers}", stacklevel=3)
    check_types('my_LSTM', bool, bias=bias, batch_first=batch_first)
    check_types('my_LSTM', int, num_layers=num_layers)
    check_sizes('my_LSTM', input_size, hidden_size, proj_size)
    if num_layers <= 0:
        raise ValueError(f"my_LSTM: num_layers must be greater than zero, got {num_layers}")


def check_lstm_input(lstm, x, packed, batch_sizes):
    """Check x (T, H_in); returns whether autocast is on (nn.LSTM skips the dtype check then)."""
    if not batch_sizes:
        raise RuntimeError("my_LSTM: Expected sequence length to be larger than 0 in RNN")
    weight = lstm.cells['l0'].fc_ii.weight
    autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        # nn.LSTM checks dense input only; packed input fails in its kernel, with a RuntimeError
        raise (RuntimeError if packed else ValueError)(
            f"my_LSTM: RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
    if x.size(-1) != lstm.input_size:
        raise RuntimeError(f"my_LSTM: input.size(-1) must be equal to input_size. "
                           f"Expected {lstm.input_size}, got {x.size(-1)}")
    return autocast


def check_hidden(lstm, hx, batched, N, h_out):
    """hx's (h_0, c_0) checked, and as (D * num_layers, N, .) for unbatched input too."""
    h0, c0 = hx
    want = 3 if batched else 2
    if h0.dim() != want or c0.dim() != want:
        raise RuntimeError(f"my_LSTM: For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx and cx "
                           f"should also be {want}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors")
    if not batched:
        h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    for k, (state, size) in enumerate(((h0, h_out), (c0, lstm.hidden_size))):
        expected = (lstm.num_layers * (2 if lstm.bidirectional else 1), N, size)
        if tuple(state.shape) != expected:
            raise RuntimeError(f"my_LSTM: Expected hidden[{k}] size {expected}, got {list(state.shape)}")
    return h0, c0


def check_cell_input(input, hx, input_size, h_out, hidden_size):
    if input.dim() not in (1, 2):
        raise ValueError(f"my_LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for k, state in enumerate(hx or ()):
        if state.dim() not in (1, 2):
            raise ValueError(f"my_LSTMCell: Expected hx[{k}] to be 1D or 2D, got {state.dim()}D instead")
    if input.size(-1) != input_size:
        raise RuntimeError(f"my_LSTMCell: input has inconsistent input_size: got {input.size(-1)} expected {input_size}")
    for k, (state, size) in enumerate(zip(hx or (), (h_out, hidden_size))):
        if state.size(-1) != size:
            raise RuntimeError(f"my_LSTMCell: hidden{k} has inconsistent hidden_size: got {state.size(-1)}, "
                               f"expected {size}")
        if state.shape[:-1] != input.shape[:-1]:
            raise RuntimeError(f"my_LSTMCell: Input batch size {input.size(0) if input.dim() == 2 else 1} "
                               f"doesn't match hidden{k} batch size {state.size(0) if state.dim() == 2 else 1}")
