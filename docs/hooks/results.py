"""mkdocs hook: benchmark tables, plots and figures, rendered from benchmarks/results/*.json.

No figure is typed into the docs by hand: a page names a results file (written by
`python -m benchmarks ...`) and the part of it to show, and the build renders it.

- `<!-- results: NAME TABLE -->`: the table TABLE of results/NAME.json, with its caption and the
  command, commit, date and machine that produced it;
- `<!-- plot: NAME KIND -->`: a plot of it, KIND one of `methods` (each method's mean test loss
  over targets with its standard error, from a selection run) or `scatter` (estimate against the
  real fine-tune's loss, per target, from a fidelity run);
- `<!-- value: NAME TABLE ROW COLUMN -->`: one cell, ROW given as `key=value` of its first column.

A marker that names a missing file, table, row or column fails a strict build. The README's
results table and manifest excerpt are made here too (`python docs/hooks/results.py --readme`
rewrites them; tests/test_docs.py checks that they are current).
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, Table, format_cell  # noqa: E402

MARKER = re.compile(r"<!--\s*(results|plot|value):\s*(.*?)\s*-->")
README = ROOT / "README.md"


class MissingResult(LookupError):
    """A marker names a results file, table, row or column that does not exist."""


def load(name: str, folder: Path = RESULTS) -> dict:
    path = folder / f"{name}.json"
    if not path.exists():
        raise MissingResult(f"no results file {path.relative_to(ROOT)}: run the benchmark that writes it")
    return json.loads(path.read_text())


def table(name: str, key: str, folder: Path = RESULTS) -> Table:
    data = load(name, folder)
    if key not in data["tables"]:
        raise MissingResult(f"{name}.json has no table {key!r} (it has {', '.join(data['tables'])})")
    return Table.from_json(data["tables"][key])


def provenance(data: dict) -> str:
    m = data["machine"]
    dirty = " (uncommitted changes)" if data.get("dirty") else ""
    return (f"`{data['command']}` · commit `{data['commit']}`{dirty} · {data['date'][:10]} · {m['cpu']}, "
            f"{m['threads']} threads · {data['seconds']} s · `benchmarks/results/{data['name']}.json`")


def row_of(t: Table, selector: str) -> dict:
    key, _, value = selector.partition("=")
    for row in t.rows:
        if str(row.get(key)) == value:
            return row
    raise MissingResult(f"no row with {key} = {value!r} in table {t.caption[:60]!r}")


def value(name: str, key: str, selector: str, column: str, folder: Path = RESULTS) -> str:
    t = table(name, key, folder)
    specs = {c[0]: c[2] for c in t.columns}
    if column not in specs:
        raise MissingResult(f"{name}.json's table {key!r} has no column {column!r}")
    return format_cell(row_of(t, selector).get(column), specs[column])


def render_results(name: str, key: str, folder: Path = RESULTS) -> str:
    t = table(name, key, folder)
    return f"{t.markdown()}\n\n<small>{t.caption}. {provenance(load(name, folder))}</small>\n"


# --- plots ---------------------------------------------------------------------------------------


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plot_methods(data: dict):
    """Each method's mean test loss over targets, with the standard error over seeds of that mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_target = data["raw"]["per_target"]
    methods = [r["method"] for r in next(iter(per_target.values())) if not r.get("of")]
    means, errors = [], []
    for m in methods:
        by_seed = np.mean([next(r for r in rows if r["method"] == m)["test"] for rows in per_target.values()], axis=0)
        means.append(by_seed.mean())
        errors.append(by_seed.std(ddof=1) / np.sqrt(len(by_seed)) if len(by_seed) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(methods) + 1))
    ax.barh(methods, means, xerr=errors, color=["#888" if m in ("all", "random", "gradient_similarity") else "#2a6"
                                                 for m in methods], capsize=3)
    low = min(means) - 3 * max(errors + [0.01])
    ax.set_xlim(left=max(0.0, low))
    ax.invert_yaxis()
    ax.set_xlabel(f"mean test loss over {len(per_target)} targets (± standard error over seeds; lower is better)")
    return fig


def plot_scatter(data: dict):
    """Per target, each verified subset's estimate against its real fine-tune's validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = data["raw"]["subsets"]
    targets = list(dict.fromkeys(s["target"] for s in subsets))
    fig, axes = plt.subplots(1, len(targets), figsize=(3 * len(targets), 3), squeeze=False)
    spearman = {r["target"]: r.get("spearman") for r in data["tables"]["fidelity"]["rows"]}
    for ax, target in zip(axes[0], targets):
        points = [s for s in subsets if s["target"] == target]
        ax.scatter([p["estimate"] for p in points], [p["true_loss"] for p in points], s=12,
                   c=["#c33" if not p["subset"].startswith("random") else "#36c" for p in points])
        ax.set_title(f"{target}\nSpearman {spearman.get(target, float('nan')):.2f}", fontsize=9)
        ax.set_xlabel("estimate", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("validation loss after a real fine-tune", fontsize=8)
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable] = {"methods": plot_methods, "scatter": plot_scatter}


def render_plot(name: str, kind: str, folder: Path = RESULTS) -> str:
    if kind not in PLOTS:
        raise MissingResult(f"unknown plot kind {kind!r} (kinds: {', '.join(PLOTS)})")
    data = load(name, folder)
    fig = PLOTS[kind](data)
    import matplotlib.pyplot as plt

    encoded = _png(fig)
    plt.close(fig)
    return (f'<img alt="{kind} plot of {name}" src="data:image/png;base64,{encoded}">\n\n'
            f"<small>{provenance(data)}</small>\n")


def render(markdown: str, folder: Path = RESULTS) -> str:
    """Every marker of a page replaced by what it names."""
    def replace(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split()
        if kind == "results" and len(args) == 2:
            return render_results(*args, folder=folder)
        if kind == "plot" and len(args) == 2:
            return render_plot(*args, folder=folder)
        if kind == "value" and len(args) == 4:
            return value(*args, folder=folder)
        raise MissingResult(f"malformed marker {match.group(0)!r}")

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    try:
        return render(markdown)
    except MissingResult as err:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_path}: {err}") from None


# --- the README's results table ------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """One README row: a claim, and how its figure and verdict come out of a results file."""

    claim: str
    results: str
    figure: Callable[[Path], tuple[str, str]]  # results folder -> (the figure in words, the verdict)


def verdict(cell: dict | None, lower_is_better: bool = True) -> str:
    """A paired difference's verdict: beyond two standard errors either way, or a tie."""
    if cell is None or cell.get("se") is None:
        return "—"
    mean, se = cell["mean"], cell["se"]
    better = -mean if lower_is_better else mean
    return "wins" if better > 2 * se else "loses" if better < -2 * se else "ties"


def _versus(name: str, baseline: str, label: str) -> Callable[[Path], tuple[str, str]]:
    def figure(folder: Path) -> tuple[str, str]:
        t = table(name, "over_targets", folder)
        row = row_of(t, "method=group_effect")
        below = row.get(f"below_{baseline}", "—")
        cell = row.get(f"vs_{baseline}")
        return (f"{format_cell(row['test'], '.3f')} against {format_cell(row_of(t, 'method=' + baseline)['test'], '.3f')} "
                f"for {label}: "
                f"{format_cell(cell, '+.3f')} (paired, ± se), lower on {below} targets"), verdict(cell)
    return figure


BASELINES = {"gradient similarity": "gradient_similarity", "DSIR": "dsir",
             "representation similarity": "representation_similarity"}


def _best_share(folder: Path) -> tuple[str, str]:
    """The default against the best fixed share of any ranking (the lowest mean test loss over the
    targets, which a user could only know by fine-tuning every share on every target)."""
    t = table("selection-t0-pretrained-epochs", "fixed_shares", folder)
    best = min(t.rows, key=lambda r: r["test"])
    cell = best["vs_default"]
    return (f"{best['default']:.3f} against {best['test']:.3f} for the best of {len(t.rows)} fixed shares "
            f"({best['candidate']}): {format_cell(cell, '+.3f')} (paired, ± se), lower on "
            f"{best['default_lower']} targets"), verdict(cell)


def _fidelity(folder: Path) -> tuple[str, str]:
    """The median Spearman against the best baseline's; the verdict from the targets one by one
    (a Spearman over a few dozen subsets has no standard error here): above the best baseline on
    every target wins, below on every target loses, else a tie."""
    t = table("fidelity-t0-pretrained", "fidelity", folder)
    median = row_of(t, "target=median over targets")
    best = max(BASELINES, key=lambda k: median.get(BASELINES[k]) if median.get(BASELINES[k]) is not None else -2)
    targets = [r for r in t.rows if r is not median]
    above = sum(r["spearman"] > max(r.get(c) or -2 for c in BASELINES.values()) for r in targets)
    word = "wins" if above == len(targets) else "loses" if above == 0 else "ties"
    return (f"median Spearman {median['spearman']:.2f} over {len(targets)} targets; best baseline {best} "
            f"{median[BASELINES[best]]:.2f}; above every baseline on {above}/{len(targets)} targets"), word


def _smollm2(folder: Path) -> tuple[str, str]:
    """One target and one seed: the figures, and no verdict (a single seed has no standard error)."""
    data = load("selection-t0-smollm2-pretrained-epochs", folder)
    key = next(k for k in data["tables"] if k.startswith("target:"))
    t = Table.from_json(data["tables"][key])
    ours, base = row_of(t, "method=group_effect"), row_of(t, "method=all")
    return (f"{key.split(':', 1)[1]}: keeps {ours['groups']} of {base['groups']} groups, test loss "
            f"{format_cell(ours['test'], '.3f')} against all sources' {format_cell(base['test'], '.3f')} "
            f"(one seed)"), "ties (keeps all)" if ours["rows"] == base["rows"] else "no verdict (one seed)"


def _gsm8k(folder: Path) -> tuple[str, str]:
    t = table("selection-gsm8k-pretrained-epochs", "target:gsm8k-pretrained", folder)
    ours, base = row_of(t, "method=group_effect"), row_of(t, "method=all")
    cell = ours.get("vs_all")
    return (f"keeps {ours['groups']} of {base['groups']} groups: test loss {format_cell(ours['test'], '.3f')} "
            f"against all sources' {format_cell(base['test'], '.3f')}"), verdict(cell) if ours["groups"] != \
        base["groups"] else "ties (keeps all)"


def _demo(folder: Path) -> tuple[str, str]:
    t = table("selection-demo-epochs", "target:demo", folder)
    ours, base = row_of(t, "method=group_effect"), row_of(t, "method=all")
    return (f"keeps {ours['groups']} groups, {ours['harmful']} of all sources' {base['harmful']} corrupted rows; test "
            f"loss {format_cell(ours['test'], '.3f')} against {format_cell(base['test'], '.3f')}"), \
        "wins" if ours["harmful"] == 0 and ours["test"]["mean"] < base["test"]["mean"] else "loses"


HEADLINES = (
    Headline("Ranks subsets as real fine-tunes do (T0)", "fidelity-t0-pretrained", _fidelity),
    Headline("Trained for epochs (T0, 6 targets): against all sources", "selection-t0-pretrained-epochs",
             _versus("selection-t0-pretrained-epochs", "all", "all sources")),
    Headline("Trained for epochs (T0): against gradient similarity under the same keep rule", "selection-t0-pretrained-epochs",
             _versus("selection-t0-pretrained-epochs", "gradient_similarity", "gradient similarity")),
    Headline("Trained for epochs (T0): against the best fixed share of any ranking", "selection-t0-pretrained-epochs",
             _best_share),
    Headline("Trained for equal steps (T0): against all sources", "selection-t0-pretrained-steps",
             _versus("selection-t0-pretrained-steps", "all", "all sources")),
    Headline("SmolLM2-135M-Instruct with LoRA (T0), trained for epochs: against all sources",
             "selection-t0-smollm2-pretrained-epochs", _smollm2),
    Headline("GSM8K chain-of-thought, trained for epochs", "selection-gsm8k-pretrained-epochs", _gsm8k),
    Headline("The demo: helpful groups kept, corrupted rows dropped", "selection-demo-epochs", _demo),
)


def readme_table(folder: Path = RESULTS) -> str:
    lines = ["| claim | measured | verdict |", "|---|---|---|"]
    for h in HEADLINES:
        figure, word = h.figure(folder)
        lines.append(f"| {h.claim} | {figure} ([{h.results}](benchmarks/results/{h.results}.json)) | **{word}** |")
    return "\n".join(lines)


def manifest_excerpt(folder: Path = RESULTS) -> str:
    """The default's decision on the demo's best group, as the build's manifest records it."""
    demo = load("selection-demo-epochs", folder)["raw"]["per_target"]["demo"]
    decisions = next(r["decisions"] for r in demo if r["method"] == "group_effect")
    best = min((d for d in decisions if d["selected"]), key=lambda d: d["rank"])
    keys = ("group", "source", "examples", "score", "ci95", "rank", "selected", "reason")
    shown = {k: round(best[k], 3) if isinstance(best[k], float) else best[k] for k in keys if k in best}
    return "```json\n" + json.dumps(shown, ensure_ascii=False) + "\n```"


GENERATED = {"results-table": readme_table, "manifest-excerpt": manifest_excerpt}


def readme_with_table(readme: str, folder: Path = RESULTS) -> str:
    """The README with each generated block (between `<!-- NAME: begin -->` and `<!-- NAME: end -->`)
    made again from the results files."""
    for name, make in GENERATED.items():
        begin_mark, end_mark = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
        begin, end = readme.index(begin_mark) + len(begin_mark), readme.index(end_mark)
        readme = readme[:begin] + "\n" + make(folder) + "\n" + readme[end:]
    return readme


if __name__ == "__main__":
    if sys.argv[1:] != ["--readme"]:
        sys.exit("usage: python docs/hooks/results.py --readme   (rewrites README.md's results table)")
    README.write_text(readme_with_table(README.read_text()))
    print(f"rewrote the results table in {README}")
