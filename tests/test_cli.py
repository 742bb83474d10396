"""The command line: stylize, demo, plan, errors, every generated flag.

Most tests call ``nsf.cli.main`` in-process (what a subprocess would add is the interpreter start); two run
``python -m nsf`` in a real subprocess as a user would (marked slow): stylize with its progress bar and provenance,
and the demo on the bundled images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsf.cli import build_parser
from nsf.config import FIELD_NAMES
from nsf.image import read_metadata
from nsf.weights import VGG19Weights

REPO = Path(__file__).resolve().parents[1]


def run_nsf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m nsf ARGS` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nsf", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def call_nsf(*args: str, capsys) -> tuple[int, str, str]:
    """`nsf ARGS` in this process: (exit code, stdout, stderr). argparse's own errors exit through SystemExit."""
    from nsf.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pair(tmp_path):
    content = tmp_path / "content.png"
    style = tmp_path / "style.jpg"
    Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(content)
    Image.effect_noise((50, 50), 80).convert("RGB").save(style)
    return content, style


def test_every_config_field_has_a_flag():
    parser = build_parser()
    args = parser.parse_args(["stylize", "c", "s", "-o", "o.png"])
    assert set(FIELD_NAMES) <= set(vars(args))
    assert all(getattr(args, f) is None for f in FIELD_NAMES)  # unset flags defer to the preset


def test_builder_flags_default_to_the_builders_own_defaults():
    """The builder's defaults are written once, in nsf.style_fusion's signature: every one has a flag that
    defaults to it."""
    import inspect

    from nsf.model import style_fusion

    params = {n: p.default for n, p in inspect.signature(style_fusion).parameters.items() if n != "options"}
    args = build_parser().parse_args(["stylize", "c", "s", "-o", "o.png"])
    assert set(params) == {"weights", "device", "compile", "precision", "channels_last", "cuda_graphs",
                           "max_memory", "preset"}
    assert {name: getattr(args, name) for name in params} == params


def test_list_flags_parse():
    args = build_parser().parse_args(["stylize", "c", "s", "t", "-o", "o.png", "--style-layers", "relu1_1,relu2_1",
                                      "--style-blend-weights", "0.7,0.3", "--preserve-color"])
    assert args.style_layers == ("relu1_1", "relu2_1")
    assert args.style_blend_weights == (0.7, 0.3)
    assert args.preserve_color == "luminance"
    assert args.styles == ["s", "t"]


@pytest.mark.parametrize("flags,expected", [(["--preserve-color"], "luminance"),
                                            (["--preserve-color", "histogram"], "histogram"),
                                            (["--no-preserve-color"], "off"), ([], None)])
def test_preserve_color_flag_forms(flags, expected):
    """--preserve-color alone still means the luminance transfer it meant as a boolean flag."""
    args = build_parser().parse_args(["stylize", "c", "s", "-o", "o.png", *flags])
    assert args.preserve_color == expected


def test_bare_preserve_color_runs_the_luminance_transfer(pair, tmp_path, capsys, shared_model):
    flags = [*(x for kv in FAST_FLAGS.items() for x in kv), "--preserve-color"]
    assert _stylize(tmp_path, pair, flags, capsys)["params"]["preserve_color"] == "luminance"
    flags = [*(x for kv in FAST_FLAGS.items() for x in kv), "--style-loss", "sliced"]
    assert _stylize(tmp_path, pair, flags, capsys)["params"]["style_loss"] == "sliced"


def test_a_bad_choice_is_an_error_naming_the_choices(pair, tmp_path, capsys, shared_model):
    from nsf.cli import main

    content, style = pair
    code = main(["stylize", str(content), str(style), "-o", str(tmp_path / "o.png"), "--no-progress",
                 "--preserve-color", "sepia"])
    err = capsys.readouterr().err
    assert code == 2 and "preserve_color 'sepia'" in err and "allowed: off, luminance, histogram" in err


@pytest.mark.slow
def test_stylize_writes_png_with_provenance(pair, tmp_path):
    content, style = pair
    out = tmp_path / "sub" / "out.png"
    r = run_nsf("stylize", str(content), str(style), "-o", str(out), "--size", "40", "--steps", "4",
                "--seed", "7", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert "step" in r.stderr  # the tqdm progress bar
    img = Image.open(out)
    assert img.size == (40, 30)
    meta = read_metadata(out)
    import nsf

    assert meta["nsf_version"] == nsf.__version__
    assert meta["weights"] == "caffe"
    assert meta["weights_sha256"] == VGG19Weights.CAFFE.value.sha256
    assert meta["seed"] == 7
    assert meta["params"]["steps"] == 4 and meta["params"]["size"] == 40
    assert set(FIELD_NAMES) == set(meta["params"])


@pytest.mark.slow
def test_demo_runs_on_bundled_images(tmp_path):
    r = run_nsf("demo", "--size", "48", "--steps", "3", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "nsf-demo.png"
    assert Image.open(out).size == (48, 48)  # the bundled astronaut is square
    assert read_metadata(out)["params"]["size"] == 48


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--steps", "-3"], "steps=-3"),
        (["--size", "100000"], "size=100000"),
        (["--style-layers", "relu9_9"], "relu9_9"),
        (["--weights", "nonsense"], "unknown weights 'nonsense'"),
        (["--style-weight", "-1"], "style_weight=-1"),
        (["--channels-last", "maybe"], "channels_last='maybe'; allowed"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_bad_options_exit_2_with_a_message(pair, tmp_path, extra, needle, capsys, shared_model):
    content, style = pair
    code, _, err = call_nsf("stylize", str(content), str(style), "-o", str(tmp_path / "o.png"), "--no-progress",
                            *extra, capsys=capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_missing_and_non_image_files(pair, tmp_path, capsys, shared_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content, style = pair
    code, _, err = call_nsf("stylize", str(tmp_path / "nope.jpg"), str(style), "-o", "o.png", "--no-progress",
                            capsys=capsys)
    assert code == 2 and "does not exist" in err and "nope.jpg" in err
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, _, err = call_nsf("stylize", str(content), str(text), "-o", "o.png", "--no-progress", capsys=capsys)
    assert code == 2 and "not a readable image" in err
    assert not (tmp_path / "o.png").exists()


def test_plan_prints_the_schedule_with_tiles_and_refuses_bad_budgets(capsys):
    code, out, err = call_nsf("plan", "4000x3000", "--size", "4096", "--max-memory", "8GB", "--no-timing",
                              "--device", "cpu", capsys=capsys)
    assert code == 0, err
    assert "budget 8.00 GB" in out and "4096x3072" in out and " of " in out  # tiled at 4096
    assert "predicted peak" in out
    code, _, err = call_nsf("plan", "--size", "8192", "--max-memory", "1.5GB", "--no-timing", "--device", "cpu",
                            capsys=capsys)
    assert code == 2 and "does not fit max_memory=1.50 GB" in err and "fits" in err
    code, _, err = call_nsf("plan", "--max-memory", "8 gigs", "--no-timing", capsys=capsys)
    assert code == 2 and "max_memory='8 gigs'; allowed" in err


def test_stylize_16_bit_png_with_the_plan_in_its_provenance(pair, tmp_path, capsys, shared_model):
    content, style = pair
    out = tmp_path / "o16.png"
    code, stdout, err = call_nsf("stylize", str(content), str(style), "-o", str(out), "--size", "40", "--steps", "3",
                                 "--bit-depth", "16", "--no-progress", "--device", "cpu", capsys=capsys)
    assert code == 0, err
    assert "16-bit" in stdout
    data = out.read_bytes()
    assert data[24] == 16  # IHDR bit depth
    meta = read_metadata(out)
    assert meta["bit_depth"] == 16 and meta["plan"]["scales"][-1]["size"] == [30, 40]
    code, _, err = call_nsf("stylize", str(content), str(style), "-o", str(tmp_path / "o.jpg"), "--bit-depth", "16",
                            capsys=capsys)
    assert code == 2 and "a .png output" in err


# --- every generated flag, run once -------------------------------------------------------------
# A valid value for each StyleConfig flag: (the flag's arguments, what the output's provenance must hold for
# the field, other flags the value needs). Runs are in-process on a tiny image with one shared model: the
# whole set takes seconds. A field added to StyleConfig without a row here fails the coverage test.
FLAG_RUNS: dict[str, tuple[list[str], object, list[str]]] = {
    "size": (["40"], 40, []),
    "steps": (["1"], 1, []),
    "content_weight": (["2.5"], 2.5, []),
    "style_weight": (["0.5"], 0.5, []),
    "tv_weight": (["0.1"], 0.1, []),
    "content_layers": (["relu1_2"], ["relu1_2"], []),
    "content_layer_weights": (["0.5"], [0.5], []),
    "style_layers": (["relu1_1"], ["relu1_1"], []),
    "style_layer_weights": (["0.25,0.75"], [0.25, 0.75], []),
    "normalize_losses": ([], False, []),  # --no-normalize-losses
    "gram_norm": (["none"], "none", []),
    "style_loss": (["mean_cov"], "mean_cov", []),
    "optimizer": (["adam"], "adam", ["--lr", "0.01"]),
    "lr": (["0.5"], 0.5, []),
    "iterate_average": (["0.5"], 0.5, []),
    "init": (["noise"], "noise", []),  # crashed with "got multiple values for keyword argument 'init'"
    "style_blend_weights": (["0.7,0.3"], [0.7, 0.3], []),  # with two styles
    "style_scale": (["0.5"], 0.5, []),
    "preserve_color": (["histogram"], "histogram", []),  # --preserve-color alone: test_preserve_color_flag_forms
    "seed": (["3"], 3, []),
    "scales": (["0.5,1.0"], [0.5, 1.0], ["--scale-steps", "0.5,0.5"]),
    "scale_steps": (["1.0"], [1.0], []),
    "restore_detail": ([], False, ["--scales", "0.5,1.0", "--scale-steps", "0.5,0.5"]),  # --no-restore-detail
    "base_size": (["32"], 32, ["--size", "64"]),  # a refinement scale above base_size
    "refine_steps": (["2"], [2], ["--size", "64", "--base-size", "32"]),
    "refine_content_weight": (["1.5"], 1.5, ["--size", "64", "--base-size", "32"]),
    "refine_style_layer_weights": (["1,3"], [1.0, 3.0], ["--size", "64", "--base-size", "32"]),  # FAST_FLAGS' 2 layers
    "refine_preview_weight": (["0.5"], 0.5, ["--size", "64", "--base-size", "32"]),
    "refine_detail_layers": (["relu2_1"], ["relu2_1"], ["--size", "64", "--base-size", "32"]),
    "stroke_scale": (["pixels"], "pixels", []),
    "tol": (["0.01"], 0.01, []),
    "patience": (["1"], 1, []),
    "resize": (["square"], "square", []),
    "max_pixels": (["100000"], 100000, []),
}
FAST_FLAGS = {"--size": "32", "--steps": "2", "--scales": "1.0", "--scale-steps": "1.0", "--tol": "0",
              "--content-layers": "relu2_1", "--style-layers": "relu1_1,relu2_1"}


@pytest.fixture(scope="module")
def shared_model():
    """nsf.model.style_fusion, building each distinct model once for the module's in-process CLI runs."""
    import nsf.model

    built: dict = {}
    real = nsf.model.style_fusion

    def cached(**kw):
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if key not in built:
            built[key] = real(**kw)
        return built[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(nsf.model, "style_fusion", cached)
    yield
    mp.undo()


def _stylize(tmp_path: Path, pair, flags: list[str], capsys, styles: int = 1) -> dict:
    from nsf.cli import main

    content, style = pair
    out = tmp_path / "out.png"
    code = main(["stylize", str(content), *[str(style)] * styles, "-o", str(out), "--no-progress", "--device", "cpu",
                 *flags])
    assert code == 0, capsys.readouterr().err
    return read_metadata(out)


def test_every_generated_flag_has_a_run():
    assert set(FLAG_RUNS) == set(FIELD_NAMES)


@pytest.mark.parametrize("name", sorted(FLAG_RUNS))
def test_every_generated_flag_runs(name, pair, tmp_path, capsys, shared_model):
    args, expected, extra = FLAG_RUNS[name]
    flag = "--" + name.replace("_", "-")
    if not args:  # a boolean: the flag that sets the non-default value
        flag = flag if expected else "--no-" + name.replace("_", "-")
    flags = {**FAST_FLAGS, **dict(zip(extra[::2], extra[1::2], strict=True))}
    flags.pop(flag, None)
    if name == "style_layer_weights":
        flags["--style-layers"] = "relu1_1,relu2_1"
    argv = [*(x for kv in flags.items() for x in kv), flag, *args]
    meta = _stylize(tmp_path, pair, argv, capsys, styles=2 if name == "style_blend_weights" else 1)
    assert meta["params"][name] == expected, (name, meta["params"][name])


def test_builder_flags_reach_the_builder(pair, tmp_path, capsys, shared_model, monkeypatch):
    import nsf.model

    calls, build = [], nsf.model.style_fusion
    monkeypatch.setattr(nsf.model, "style_fusion", lambda **kw: calls.append(kw) or build(**kw))
    flags = [*(x for kv in FAST_FLAGS.items() for x in kv), "--precision", "fp32", "--channels-last", "false",
             "--cuda-graphs", "auto", "--compile", "false", "--max-memory", "8GB", "--weights", "caffe"]
    assert _stylize(tmp_path, pair, flags, capsys)["weights"] == "caffe"
    assert calls == [{"weights": "caffe", "device": "cpu", "compile": False, "precision": "fp32",
                      "channels_last": False, "cuda_graphs": "auto", "max_memory": "8GB", "preset": "default"}]


def test_init_image_flag_starts_from_the_image(pair, tmp_path, capsys, shared_model):
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(start)
    flags = [*(x for kv in FAST_FLAGS.items() for x in kv), "--steps", "1", "--optimizer", "adam", "--lr", "1e-3"]
    _stylize(tmp_path, pair, [*flags, "--init-image", str(start)], capsys)
    r, g, b = Image.open(tmp_path / "out.png").convert("RGB").getpixel((5, 5))
    assert b > 240 and r < 15 and g < 15  # one tiny step from the blue start, not from the grey gradient


def test_init_with_a_path_says_to_use_init_image(pair, tmp_path, capsys, shared_model):
    from nsf.cli import main

    content, style = pair
    code = main(["stylize", str(content), str(style), "-o", str(tmp_path / "o.png"), "--no-progress",
                 "--init", str(content)])
    err = capsys.readouterr().err
    assert code == 2 and "init=" in err and "allowed: content, noise" in err and "--init-image" in err


# --- regional styles: --masks, --style-masks ---------------------------------------------------


def test_mask_flags_parse_into_one_entry_per_style():
    from nsf.cli import mask_paths

    args = build_parser().parse_args(["stylize", "c", "a", "b", "-o", "o.png", "--masks", "ma.png, mb.png",
                                      "--style-masks", "sa.png,"])
    assert (args.masks, args.style_masks) == ("ma.png, mb.png", "sa.png,")
    assert mask_paths(args.masks, args.style_masks, 2) == {"masks": ["ma.png", "mb.png"],
                                                            "style_masks": ["sa.png", None]}
    assert mask_paths(None, "-,sb.png", 2) == {"style_masks": [None, "sb.png"]}
    assert mask_paths("m.png", "-", 1) == {"masks": ["m.png"]}  # no style mask at all: not passed
    assert mask_paths(None, None, 3) == {}


@pytest.mark.parametrize(("masks", "style_masks", "field", "needle"), [
    ("ma.png", None, "masks", "--masks='ma.png' has 1 entry for 2 style images; allowed: 2 comma-separated paths"),
    ("ma.png,mb.png,mc.png", None, "masks", "has 3 entries for 2 style images"),
    ("ma.png,", None, "masks", "leaves style 2 without a mask"),
    ("-,mb.png", None, "masks", "leaves style 1 without a mask"),
    (None, "sa.png", "style_masks", "--style-masks='sa.png' has 1 entry for 2 style images; allowed: 2"),
])
def test_mask_flags_with_a_wrong_count_are_config_errors(masks, style_masks, field, needle):
    from nsf.cli import mask_paths
    from nsf.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        mask_paths(masks, style_masks, 2)
    assert e.value.field == field and needle in str(e.value) and "one" in str(e.value.allowed)


def test_a_wrong_mask_count_exits_2_before_building_a_model(pair, tmp_path, capsys, monkeypatch):
    import nsf.model
    from nsf.cli import main

    monkeypatch.setattr(nsf.model, "style_fusion", lambda **kw: pytest.fail("built a model"))
    content, style = pair
    code = main(["stylize", str(content), str(style), str(style), "-o", str(tmp_path / "o.png"), "--no-progress",
                 "--masks", "only_one.png"])
    err = capsys.readouterr().err
    assert code == 2 and "nsf: error: --masks='only_one.png' has 1 entry for 2 style images; allowed:" in err


def test_stylize_with_masks_keeps_the_content_where_no_mask_covers(pair, tmp_path, capsys, shared_model):
    """Two styles masked into the left half (the second softly, on a quarter), a style mask for the first;
    64 px, 2 steps: the uncovered right half stays the content, the left half moves."""
    from nsf.cli import main

    content, style = pair
    left, quarter, whole = tmp_path / "left.png", tmp_path / "quarter.png", tmp_path / "whole.png"
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    mask.save(left)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(128, (0, 0, 16, 48))
    mask.save(quarter)
    Image.new("L", (50, 50), 255).save(whole)
    out = tmp_path / "out.png"
    code = main(["stylize", str(content), str(style), str(style), "-o", str(out), "--no-progress", "--device", "cpu",
                 "--size", "64", "--steps", "2", "--masks", f"{left},{quarter}", "--style-masks", f"{whole},-"])
    assert code == 0, capsys.readouterr().err
    a = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    assert a.shape == (48, 64, 3)
    moved = np.abs(a - np.asarray(Image.open(content).convert("RGB"), dtype=np.float64))
    assert moved[:, :24].mean() > 4 * moved[:, 40:].mean()
