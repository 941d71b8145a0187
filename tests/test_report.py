"""`dataselect report`: a self-contained page with plots that a headless browser renders."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from dataselect.cli import main
from dataselect.outputs import OutputError
from dataselect.report import report


def test_report_writes_html_and_markdown_naming_every_source_and_group(demo_build):
    recipe, _, manifest = demo_build
    written = report(recipe.output.path)
    page = (recipe.output.path / "report" / "index.html").read_text()
    summary = (recipe.output.path / "report" / "summary.md").read_text()
    assert page.count("data:image/png;base64,") == len(written["plots"]) >= 2  # plots embedded, no side files needed
    for source in manifest["sources"]:
        assert source in page and source in summary
    for group in manifest["groups"]:
        assert group["group"] in summary
    assert all((recipe.output.path / "report" / p).read_bytes()[:4] == b"\x89PNG" for p in written["plots"])


def test_report_refuses_a_folder_that_is_not_a_build(tmp_path):
    with pytest.raises(OutputError, match=str(tmp_path)):
        report(tmp_path)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "run `dataselect build` first" in result.output and "Traceback" not in result.output


def test_report_json_output_for_scripts(demo_build):
    recipe, _, _ = demo_build
    result = CliRunner().invoke(main, ["report", str(recipe.output.path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["html"].endswith("index.html")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium (Debian package `chromium`) not installed")
def test_headless_chromium_renders_the_plots(demo_build, tmp_path):
    from matplotlib.image import imread

    recipe, _, _ = demo_build
    page = report(recipe.output.path)["html"]
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1400", f"file://{page}"],
                   check=True, capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    green = np.abs(pixels - np.array([44, 160, 44]) / 255).max(-1) < 0.05  # the selected groups' bars
    assert green.mean() > 0.01, "no plot bars rendered"


def test_a_pipe_in_a_value_does_not_break_the_markdown_table():
    import re

    import polars as pl

    from dataselect.report import _markdown_table

    table = _markdown_table(pl.DataFrame({"group": ["flan/a|b", "x\ny"], "score": [0.5, None]}))
    for line in table.splitlines():
        assert len(re.findall(r"(?<!\\)\|", line)) == 3, line  # two columns: three unescaped pipes


def test_the_scores_plot_draws_groups_without_a_score_and_names_the_method():
    """`all` and the similarity baselines give some groups no score: each is still a bar (of 0),
    and the axis label says which method scored the groups and what its score means."""
    import matplotlib.pyplot as plt
    import polars as pl
    from matplotlib.text import Text

    from dataselect.report import SCORE_MEANING, plot_scores, scores_figure

    groups = pl.DataFrame({"group": ["a", "b", "c"], "score": [None, None, 0.25], "ci95": [None, None, 0.1],
                           "selected": [True, True, False]},
                          schema={"group": pl.String, "score": pl.Float64, "ci95": pl.Float64, "selected": pl.Boolean})
    for method, meaning in (("all", SCORE_MEANING["all"]), ("gradient_similarity", "against the average group")):
        fig = scores_figure(groups, method)
        fig.canvas.draw()  # categorical tick labels are set when drawn
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
        assert [bar.get_width() for bar in ax.patches] == [0.0, 0.0, 0.25]
        texts = [" ".join(t.get_text().split()) for t in fig.findobj(Text)]
        label = " ".join(ax.get_xlabel().split())
        assert label.startswith(f"{method} score: ") and meaning in label and label in texts
        plt.close(fig)
    assert plot_scores(groups, "all")[:4] == b"\x89PNG"
