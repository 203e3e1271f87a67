"""The sample models' quick modes (samples/): tiny training runs that must lower the loss, and
exported models whose ONNX Runtime answers equal PyTorch's exactly where it counts: the argmax
of every digits test image, and every token of a greedy generation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("sklearn")

from samples import char_lm, digits_vit  # noqa: E402


@pytest.fixture(scope="module")
def digits_data():
    return digits_vit.load_data()


def test_digits_split_is_deterministic(digits_data):
    again = digits_vit.load_data()
    for a, b in zip(digits_data, again):
        assert (a == b).all()
    x_train, y_train, x_test, y_test = digits_data
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(y_test.tolist()) == set(range(10))


@pytest.mark.parametrize("variant", ["dcmha", "reuse", "bn-sh"])
def test_digits_quick(variant, digits_data, tmp_path):
    r = digits_vit.run_variant(variant, tmp_path, digits_vit.Settings.quick(), data=digits_data)
    assert r.loss_after < r.loss_before, (r.loss_before, r.loss_after)
    assert r.disagreements == 0 and r.agreement == 1.0, f"ORT and PyTorch argmax differ on {r.disagreements} images"
    assert r.ort_accuracy == r.torch_accuracy
    assert r.torch_accuracy > 0.2  # chance is 0.1
    assert r.max_abs_logit_diff < 1e-4
    assert Path(r.onnx_path).is_file() and Path(r.checkpoint_path).is_file()


@pytest.mark.parametrize("variant", ["dcmha", "super"])
def test_char_lm_quick(variant, tmp_path):
    settings = char_lm.Settings.quick()
    r = char_lm.run_variant(variant, tmp_path, settings)
    assert r.loss_after < r.loss_before, (r.loss_before, r.loss_after)
    assert len(r.torch_tokens) == settings.tokens
    assert r.torch_tokens == r.ort_tokens, f"first mismatch at generated token {r.first_mismatch}"
    assert r.identical and r.torch_sample == r.ort_sample
    assert r.max_abs_logit_diff < 1e-4
    assert r.decode_tokens and r.decode_identical  # the decode graph through attn2onnx.generate


def test_samples_reject_wrong_variants(capsys):
    with pytest.raises(SystemExit):
        digits_vit.main(["--variants", "nonesuch"])
    with pytest.raises(SystemExit):
        char_lm.main(["--variant", "bn"])  # cannot be causal
    assert "causal" in capsys.readouterr().err


def test_zen_text():
    text = char_lm.load_text("zen")
    assert text.startswith("The Zen of Python") and "Beautiful is better than ugly." in text
    assert "def " in char_lm.load_text("module:textwrap")
