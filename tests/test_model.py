"""model.py: shapes as the docstrings state them, and a frozen ResNet that stays frozen."""
import copy

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from DIY_LSTM import my_LSTM
from model import DecoderRNN, EncoderCNN


def test_encoder_shapes_and_frozen_resnet():
    torch.manual_seed(0)
    encoder = EncoderCNN(16)
    assert all(not p.requires_grad for p in encoder.resnet.parameters())
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {'linear.weight', 'linear.bias', 'bn.weight', 'bn.bias'}
    encoder.train()
    assert encoder.training and encoder.bn.training and not encoder.resnet.training
    assert not any(m.training for m in encoder.resnet.modules()), 'every ResNet BatchNorm stays in eval mode'
    before = {k: v.clone() for k, v in encoder.resnet.state_dict().items()}
    features = encoder(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, 16)
    for key, value in encoder.resnet.state_dict().items():
        assert torch.equal(value, before[key]), f'{key} drifted in train mode'
    features.sum().backward()
    assert encoder.linear.weight.grad is not None
    assert all(p.grad is None for p in encoder.resnet.parameters())
    assert encoder.extract(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_decoder_shapes_and_teacher_forcing():
    torch.manual_seed(0)
    decoder = DecoderRNN(8, 16, vocab_size=10, num_layers=2, max_seq_length=7)
    assert isinstance(decoder.lstm, my_LSTM), "the lab's LSTM is the decoder's"
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    lengths = [5, 3]
    logits = decoder(torch.randn(2, 8), captions, lengths)
    assert logits.shape == (sum(lengths), 10)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    assert targets.tolist() == [1, 1, 5, 8, 6, 2, 7, 2], 'time-major packed order'
    assert decoder.sample(torch.randn(3, 8)).shape == (3, 7)
    assert decoder.sample(torch.randn(3, 8)).dtype == torch.long


def test_decoder_matches_nn_lstm_decoder():
    """The same decoder built on nn.LSTM (the handout's check) gives the same logits and captions."""
    torch.manual_seed(0)
    ours = DecoderRNN(8, 16, vocab_size=10, num_layers=1)
    ref = copy.deepcopy(ours)
    ref.lstm = ours.lstm.to_lstm()
    assert type(ref.lstm) is nn.LSTM
    features, captions = torch.randn(2, 8), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    torch.testing.assert_close(ours(features, captions, [4, 3]), ref(features, captions, [4, 3]))
    assert torch.equal(ours.sample(features), ref.sample(features))
