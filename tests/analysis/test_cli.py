"""``python -m interp``: help, clean errors, and (on the demo model) the lens table, the HTML file
and the site listing. Commands run in a subprocess, as a user would run them."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import pytest

from interp.cli import build_parser, main

PROMPT = "The capital of France is"


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m interp ...`` as a user runs it: the installed package, from a folder of their own."""
    return subprocess.run([sys.executable, "-m", "interp", *args], cwd=tempfile.gettempdir(), capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------- no model needed
@pytest.mark.subprocess
def test_help_documents_both_commands(capsys):
    top = run("--help")  # one real subprocess; the sub-commands' help in-process
    assert top.returncode == 0
    assert "lens" in top.stdout and "info" in top.stdout and 'python -m interp lens "The capital' in top.stdout
    for command, flags in (("lens", ("--model", "--out", "--top", "--dtype", "--target")), ("info", ("--model",))):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and all(flag in text for flag in flags)


def test_unknown_model_path_is_a_clean_error(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    proc = run("lens", PROMPT, "--model", missing, "--out", str(tmp_path / "x.html"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "no-such-model" in proc.stderr
    assert not (tmp_path / "x.html").exists()
    assert main(["info", "--model", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load model") and "no-such-model" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "lens" in capsys.readouterr().out


def test_parser_defaults():
    args = build_parser().parse_args(["lens", PROMPT])
    assert (args.model, args.out, args.top, args.dtype, args.target) == ("demo", "lens.html", 5, "float32", [])
    args = build_parser().parse_args(["lens", PROMPT, "--target", " Paris", "--target", " Lyon", "--top", "3"])
    assert args.target == [" Paris", " Lyon"] and args.top == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lens", PROMPT, "--dtype", "float16"])


def test_bad_top_is_a_clean_error(capsys):
    assert main(["lens", PROMPT, "--top", "0"]) == 1
    assert "--top" in capsys.readouterr().err


# ---------------------------------------------------------------------- the demo model
@pytest.fixture(scope="module")
def lens_run(tmp_path_factory, demo_path):
    out = tmp_path_factory.mktemp("cli") / "lens.html"
    proc = run("lens", PROMPT, "--out", str(out), "--target", " Paris")
    return proc, out


def test_lens_prints_table_and_top5(lens_run):
    proc, out = lens_run
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "layer" in text and "top token" in text and "prob" in text
    assert "embed" in text and "L17" in text and "L5 (global)" in text  # the 270M has 18 layers
    top = text.split("top 5 predictions")[1].split("wrote")[0]
    lines = [line for line in top.splitlines()[1:] if line.strip()]
    assert len(lines) == 5
    assert any("' Paris'" in line for line in lines)
    assert f"wrote {out}" in text


def test_lens_writes_offline_html(lens_run):
    proc, out = lens_run
    assert proc.returncode == 0, proc.stderr
    html = out.read_text(encoding="utf-8")
    assert len(html) > 1_000_000  # plotly.js is embedded: works offline
    assert not re.search(r"<script[^>]*\ssrc=", html)  # nothing loaded from elsewhere (no CDN)
    data, layout = figure_from_html(html)  # the figure as plotly will read it (any JSON escaping)
    assert data[0]["type"] == "heatmap"
    assert layout["xaxis"]["ticktext"] == ["&lt;bos&gt;", "The", "·capital",
                                           "·of", "·France", "·is"]


def figure_from_html(html: str) -> tuple[list, dict]:
    """The data and layout that ``Plotly.newPlot(id, data, layout, config)`` in a written page gets."""
    import json

    start = html.index("Plotly.newPlot(")
    rest = html[start + len("Plotly.newPlot("):]
    rest = rest[rest.index(",") + 1:].lstrip()  # skip the div id
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(rest)
    rest = rest[end:].lstrip().lstrip(",").lstrip()
    layout, _ = decoder.raw_decode(rest)
    return data, layout


def test_info_lists_sites(demo_path):
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "n_layers" in text and "18" in text and "d_model" in text and "640" in text
    for name in ("embed", "blocks.{i}.resid_pre", "blocks.{i}.attn.pattern", "blocks.{i}.mlp.hidden",
                 "blocks.{i}.post_mlp_norm", "blocks.{i}.resid_post", "final_norm", "logits"):
        assert name in text
    assert "[b, s, 640]" in text and "[b, 4, s, k]" in text and "[b, s, 2048]" in text
    assert "i = 0 .. 17" in text


def test_a_multi_token_target_warns_and_names_the_token_used(demo_path, capsys):
    assert main(["lens", PROMPT, "--target", " 东京", "--no-html"]) == 0
    out, err = capsys.readouterr()
    assert "warning: target ' 东京' is 2 tokens" in err and "using its first token ' 东'" in err
    assert "p(' 东')" in out
