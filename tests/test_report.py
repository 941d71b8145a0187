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


def test_the_scores_plot_draws_the_bound_each_rule_tested_beside_the_groups_own_interval():
    """The keep rule compares min_score with a Holm-adjusted bound, wider than the ±95% interval
    of each bar: the plot marks that bound for every group tested, and its legend says which is which."""
    import matplotlib.pyplot as plt
    import polars as pl
    from matplotlib.collections import PathCollection
    from matplotlib.text import Text

    from dataselect.report import scores_figure

    groups = pl.DataFrame({"group": ["a", "b", "c"], "score": [0.3, 0.12, None], "ci95": [0.1, 0.1, None],
                           "adjusted_bound": [0.17, -0.01, None], "selected": [True, False, False]})
    fig = scores_figure(groups, "group_effect", {"threshold_on": "low_end", "min_score": 0.0})
    fig.canvas.draw()
    markers = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert len(markers) == 1 and sorted(markers[0].get_offsets()[:, 0].tolist()) == [-0.01, 0.17]
    texts = " ".join(" ".join(t.get_text().split()) for t in fig.findobj(Text))
    assert "Holm-adjusted low end: what the keep rule compared with min_score" in texts
    assert "score, ±95% interval (the group's own)" in texts
    plt.close(fig)
    fig = scores_figure(groups.drop("adjusted_bound"), "group_effect")  # an older manifest: the bars alone
    assert not [c for c in fig.axes[0].collections if isinstance(c, PathCollection)] and not fig.legends
    plt.close(fig)


def test_the_groups_table_shows_the_adjusted_bound_and_the_level_it_was_taken_at():
    from dataselect.report import group_table

    row = {"group": "s/a", "source": "s", "score": 0.06, "ci95": 0.045, "examples": 10, "tokens": 90,
           "selected": False, "reason": "dropped: ..."}
    manifest = {"groups": [{**row, "rank": 1, "p_value": 0.004, "holm_level": 0.025 / 13, "holm_reached": True,
                            "adjusted_bound": -0.003},
                           {**row, "group": "s/b", "rank": 2, "p_value": 0.3, "holm_level": 0.025 / 12,
                            "holm_reached": False, "adjusted_bound": -0.08}]}
    table = group_table(manifest)
    assert table.columns.index("adjusted_bound") == table.columns.index("ci95") + 1
    assert table["holm_level"].to_list() == ["0.025/13", "0.025/12 (not reached)"]
    assert table["adjusted_bound"].to_list() == [-0.003, -0.08]
    old = {"groups": [{k: v for k, v in g.items() if k not in ("p_value", "holm_level", "holm_reached",
                                                               "adjusted_bound")} for g in manifest["groups"]]}
    assert "adjusted_bound" not in group_table(old).columns  # a manifest from before: as it was
