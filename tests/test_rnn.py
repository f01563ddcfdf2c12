"""run_lstm: the padded, unpacked LSTM equals the packed nn.LSTM, values and gradients."""

import json

import pytest
import torch
from torch import nn

from bp_apps.text.labeling.rnn import run_lstm


def packed_reference(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.parametrize("layers,bidirectional,bias", [(1, True, True), (3, True, True), (2, False, True),
                                                       (2, True, False)])
def test_run_lstm_equals_packed_lstm(layers, bidirectional, bias):
    torch.manual_seed(layers)
    lstm = nn.LSTM(7, 5, num_layers=layers, bidirectional=bidirectional, batch_first=True, bias=bias)
    lengths = torch.tensor([6, 1, 4, 6, 3])
    x = torch.randn(5, 6, 7, requires_grad=True)
    expected = packed_reference(lstm, x, lengths)
    got = run_lstm(lstm, x, lengths)
    assert got.shape == expected.shape == (5, 6, 5 * (2 if bidirectional else 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got[1, 1:].abs().max() == 0  # padding is zero
    weights = torch.randn_like(expected)  # a loss that weighs every output differently
    grads_expected = torch.autograd.grad((expected * weights).sum(), [x, *lstm.parameters()])
    grads_got = torch.autograd.grad((got * weights).sum(), [x, *lstm.parameters()])
    for a, b in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_run_lstm_backward_direction_ignores_padding():
    """Changing what lies in the padding changes nothing a sentence's tokens see."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    lengths = torch.tensor([2, 5])
    noisy = x.clone()
    noisy[0, 2:] = 100.0
    torch.testing.assert_close(run_lstm(lstm, x, lengths), run_lstm(lstm, noisy, lengths))


def test_run_lstm_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, bidirectional=True, batch_first=True)
    x, lengths = torch.randn(2, 5, 3), torch.tensor([5, 3])
    lstm.eval()
    torch.testing.assert_close(run_lstm(lstm, x, lengths), packed_reference(lstm, x, lengths))
    lstm.train()
    assert not torch.allclose(run_lstm(lstm, x, lengths), run_lstm(lstm, x, lengths))


def test_run_lstm_rejects_unsupported_input():
    with pytest.raises(ValueError, match="batch_first"):
        run_lstm(nn.LSTM(3, 4), torch.randn(2, 5, 3), torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="lengths"):
        run_lstm(nn.LSTM(3, 4, batch_first=True), torch.randn(2, 5, 3), torch.tensor([5]))


def test_bench_lstm_script_prints_and_writes_its_figures(tmp_path, capsys):
    from test_summarization_decoding import load_script

    bench = load_script("bench_lstm")
    out = tmp_path / "lstm.json"
    assert bench.main(["--lengths", "3", "9", "--batch", "4", "--features", "6", "--hidden", "5", "--repeats", "2",
                       "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["length"] for row in report["rows"]] == [3, 9]
    for row in report["rows"]:
        assert row["packed_ms"] > 0 and row["padded_ms"] > 0
        assert row["speedup"] == pytest.approx(row["packed_ms"] / row["padded_ms"])
        assert row["max_abs_difference"] < 1e-5  # the two compute the same thing
    assert "| 9 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench.main(["--repeats", "0"])
