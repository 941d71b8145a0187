"""A report of a finished build: why each group was kept, at a glance, from the manifest.

Writes `<output>/report/index.html` (one self-contained page, plots embedded as PNG) and
`<output>/report/summary.md` (the same tables, plots beside it as PNG files): per-group scores
with 95% intervals, selected / dropped / rejected examples and tokens per source, the confirm
stage's candidate mixtures (predicted against measured), and the estimates against real
fine-tunes when `dataselect verify` has run for the recipe.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from .artifacts import ROWS, Run
from .examples import reason_class
from .outputs import cell, read_manifest, text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def group_table(manifest: dict) -> pl.DataFrame:
    groups = pl.DataFrame(manifest["groups"])
    weights = [c for c in ("repeats", "share") if c in groups.columns]
    return groups.select("rank", "group", "source", "score", "ci95", *tested_columns(groups), "examples", "tokens",
                         "selected", *weights, "reason").sort("rank")


def tested_columns(groups: pl.DataFrame) -> list[pl.Expr]:
    """Beside a group's own 95% interval, the number its keep rule compared with min_score: the
    Holm-adjusted bound (`adjusted_bound`) and the level it was taken at, as `0.025/13` (marked
    where the step-down stopped before it). None for a build whose rule tested no interval."""
    if "adjusted_bound" not in groups.columns or groups["adjusted_bound"].is_null().all():
        return []
    divisor = (0.025 / pl.col("holm_level")).round(0).cast(pl.Int64).cast(pl.String)
    level = (pl.when(pl.col("holm_level").is_null()).then(None)
             .when(pl.col("holm_reached")).then(pl.format("0.025/{}", divisor))
             .otherwise(pl.format("0.025/{} (not reached)", divisor)))
    return [pl.col("adjusted_bound"), level.alias("holm_level")]


def candidate_table(manifest: dict) -> pl.DataFrame | None:
    """The confirm stage's account: each candidate mixture, its estimate, what its fine-tunes
    measured and cost, the loss predicted for it from the others, and why it won or lost."""
    found = manifest.get("candidates")
    if not found or len(found) < 2:
        return None
    return pl.DataFrame(found).select("candidate", "groups", "rows", "cost", "estimate", "estimate_ci95", "short_loss",
                                      "validation_loss", "predicted", "predicted_interval90", "decision")


def confirm_sentence(manifest: dict) -> str | None:
    """What the confirmation chose and spent, in words; None where it did not run."""
    c = manifest["stages"].get("confirm")
    if not c:
        return None
    if not c.get("confirmed"):
        return f"Not confirmed by fine-tunes ({c.get('why', 'select.confirm is 0')}): the keep rule's groups."
    predicted = (f" No predicted loss: {c['no_prediction']}." if c.get("no_prediction") else
                 "" if c["predicted_validation_loss"] is None else
                 f" A retrain is predicted at {c['predicted_validation_loss']:.4f} ± {c['predicted_interval90']:.3f} "
                 "(90%).")
    return (f"Confirmed by real fine-tunes ({c['training']}): '{c['chosen']}' reached validation loss "
            f"{c['validation_loss']:.4f} against all sources' {c['all_sources_validation_loss']:.4f}, among "
            f"{c['candidates']} candidates, for {c['cost']:.2f} full fine-tunes of the pool (budget "
            f"{c['budget']:.2f}).{predicted}")


def source_table(manifest: dict) -> pl.DataFrame:
    """Per source: rows by fate, and tokens selected and dropped."""
    groups = pl.DataFrame(manifest["groups"])
    tokens = groups.group_by("source").agg(
        pl.col("tokens").filter(pl.col("selected")).sum().alias("tokens_selected"),
        pl.col("tokens").filter(~pl.col("selected")).sum().alias("tokens_dropped"))
    counts = pl.DataFrame([{"source": k, **{c: v[c] for c in ("rows", "selected", "not_selected", "rejected")}}
                           for k, v in manifest["sources"].items()])
    return counts.join(tokens, on="source", how="left").fill_null(0)


DUPLICATES = "Duplicates and contamination"


def duplicates_section(manifest: dict) -> tuple[str, list[pl.DataFrame]] | None:
    """The manifest's duplicates section as a sentence, a table per kind and example pairs; None
    for a manifest without one."""
    found = manifest.get("duplicates")
    if found is None:
        return None
    rows = []
    for kind, pairs in found["pairs"].items():
        hit = found["contaminated"].get(kind)
        rows.append({"kind": kind, "pairs": pairs, "source rows copying the split": hit and hit["source_rows"],
                     "of them selected": hit and hit["selected_rows"]})
    counts = pl.DataFrame(rows, schema={"kind": pl.String, "pairs": pl.Int64,
                                        "source rows copying the split": pl.Int64, "of them selected": pl.Int64})
    examples = pl.DataFrame(found["examples"], schema={"id_a": pl.String, "id_b": pl.String, "kind": pl.String,
                                                       "jaccard": pl.Float64})
    note = (f"{found['source_rows_involved']} source rows are near-duplicates (word {found['ngram']}-gram Jaccard "
            f"similarity ≥ {found['jaccard_threshold']}) of another source row or of a target row. Reported only: "
            "no row's selection was changed; the selected rows that copy a target split are listed in the "
            "manifest's duplicates.contaminated.")
    return note, [counts] + ([examples] if examples.height else [])


REJECTIONS = "Rejected rows"
REJECTION_EXAMPLES = 3  # example rows shown per reason class


def rejections_section(output_dir: Path, manifest: dict) -> tuple[str, list[pl.DataFrame]] | None:
    """Why rows were rejected: a sentence (how many, and the groups whose every row was), the
    reason classes with their rows and sources, and a few rows of each (id, source, group, reason,
    from rows.parquet) for the user to look up in their file; None when no row was rejected."""
    sources = manifest["sources"]
    total = sum(c["rejected"] for c in sources.values())
    if not total:
        return None
    by_reason: dict[str, dict[str, int]] = {}
    for source, c in sources.items():
        for reason, n in c.get("rejected_by_reason", {}).items():
            by_reason.setdefault(reason, {})[source] = n
    counts = pl.DataFrame([{"reason": reason, "rows": sum(per.values()),
                            "sources": ", ".join(f"{s} {n}" for s, n in sorted(per.items(), key=lambda i: -i[1]))}
                           for reason, per in by_reason.items()],
                          schema={"reason": pl.String, "rows": pl.Int64, "sources": pl.String}).sort(
        ["rows", "reason"], descending=[True, False])
    frames = [counts]
    path = Path(output_dir) / ROWS
    if path.exists():
        rejected = (pl.scan_parquet(path).filter(pl.col("status") == "rejected")
                    .select("id", "source", "group", "reason").collect())
        classes = pl.Series("class", [reason_class(r) for r in rejected["reason"]], dtype=pl.String)
        examples = (rejected.with_columns(classes).filter(pl.int_range(pl.len()).over("class") < REJECTION_EXAMPLES)
                    .join(counts.select("reason", order=pl.int_range(pl.len())), left_on="class", right_on="reason",
                          how="left").sort("order", maintain_order=True).drop("class", "order"))
        frames.append(examples)
    vanished = [g for g in manifest["groups"] if not g.get("examples") and g.get("rejected")]
    rows = sum(c["rows"] for c in sources.values())
    note = (f"{total} of {rows} source rows were rejected at ingest and never scored; rows.parquet gives each "
            "its reason, under its own id.")
    if vanished:
        note += (f" Every row of {len(vanished)} group{'s' if len(vanished) > 1 else ''} was rejected, so "
                 f"{'they are' if len(vanished) > 1 else 'it is'} in no mixture: "
                 + ", ".join(f"{g['group']} ({g['rejected']} rows)" for g in vanished) + ".")
    return note, frames


CLUSTERS = "Clusters"


def clusters_section(manifest: dict) -> tuple[str, list[pl.DataFrame]] | None:
    """What each cluster of a clustered source holds (the sketch stage's descriptions): a sentence
    on how to read them, naming each source's label columns or saying it has none, and a table per
    source: cluster, rows, its label columns' most frequent values, its distinctive words and a
    few typical prompts. None when no source is clustered, or its run predates descriptions."""
    found = {source: c for source, c in (manifest["stages"]["sketch"].get("clusters") or {}).items()
             if c.get("descriptions")}
    if not found:
        return None
    frames, labelled = [], []
    for source, c in found.items():
        columns = c.get("label_columns") or []
        labelled.append(f"{source}: {', '.join(columns)}" if columns else f"{source}: none, so its clusters are "
                        "told apart by their words and prompts alone")
        frames.append(pl.DataFrame(
            [{"group": f"{source}/{d['cluster']}", "rows": d["size"],
              "labels": "; ".join(f"{column} " + ", ".join(f"{v} {n}" for v, n in values.items())
                                  for column, values in d["labels"].items()) or "–",
              "distinctive words": ", ".join(d["words"]) or "– (none stands out)",
              "example prompts": " · ".join(f"“{e}”" for e in d["examples"])}
             for d in c["descriptions"]],
            schema={"group": pl.String, "rows": pl.Int64, "labels": pl.String, "distinctive words": pl.String,
                    "example prompts": pl.String}))
    note = ("A clustered source's groups are k-means clusters of its rows' gradients, named by size (c0 the "
            "largest). Each is described by its rows: the most frequent values of the source's label columns "
            "(columns the format does not read that hold a few repeated values; "
            + "; ".join(labelled) + "), the words most over-represented in its prompts and responses against "
            "the rest of the source (log-odds z-score), and its most typical prompts (the rows surest of their "
            "cluster).")
    return note, frames


def stability_table(manifest: dict) -> pl.DataFrame | None:
    """What could come out differently: groups kept in only some redraws of the scores within
    their intervals, and per clustered source the rows that sit near a cluster boundary."""
    rows = []
    steady = manifest["stages"]["select"].get("stability")
    if steady:
        rows.append({"what": "kept groups under score redraws",
                     "value": f"overlap {steady['mean_overlap']:.2f} mean, {steady['min_overlap']:.2f} min "
                              f"over {steady['draws']} draws"})
        rows += [{"what": f"close call: {group}", "value": f"kept in {share:.0%} of draws"}
                 for group, share in steady["close_calls"].items()]
    for source, found in (manifest["stages"]["sketch"].get("clusters") or {}).items():
        rows.append({"what": f"clusters of {source}",
                     "value": f"sizes {found['sizes']}, {found['near_boundary']} rows near a boundary "
                              f"(smallest margin {found['min_margin']:.2g})"})
    return pl.DataFrame(rows) if rows else None


def verify_results(manifest: dict) -> pl.DataFrame | None:
    recipe = manifest["recipe"]
    return Run.named(recipe["name"], recipe.get("workdir")).verification.results()


def _pyplot():
    """matplotlib's pyplot on the file-only backend: reports are built without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


SCORE_MEANING = {
    "group_effect": "estimated drop in target loss per step of training on the group alone",
    "all": "no score: every group is kept",
}


def plot_scores(groups: pl.DataFrame, method: str, rules: dict | None = None) -> bytes:
    """The scores figure as PNG bytes."""
    return _png(scores_figure(groups, method, rules))


def scores_figure(groups: pl.DataFrame, method: str, rules: dict | None = None) -> Figure:
    """One bar per group with its own 95% interval (a group without a score: a bar of 0), and, where
    the keep rule tested an interval, the bound it tested (`rules`: the select stage's resolved
    rules): a red line from the score to its Holm-adjusted bound, which is wider than the group's
    own interval since it answers for all the groups at once, with min_score marked, and a legend
    saying which is which. An axis label names the method and what its score means; plain tick
    labels (no ×1e-3 offset text, which overlapped the axis label) and a label wrapped to the
    figure's width. Returned unrendered, so that what it says can be read back."""
    import textwrap

    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    ordered = groups.sort("score", nulls_last=False)
    fig, ax = plt.subplots(figsize=(7, 0.35 * ordered.height + 1.8))
    colors = ["tab:green" if s else "tab:gray" for s in ordered["selected"]]
    at = list(range(ordered.height))
    ax.barh(at, ordered["score"].fill_null(0.0).to_list(), xerr=ordered["ci95"].fill_null(0.0).to_list(),
            color=colors, capsize=3, label="score, ±95% interval (the group's own)")
    ax.set_yticks(at, ordered["group"].to_list())
    ax.axvline(0, color="black", linewidth=0.8)
    rules = rules or {}
    tested = "adjusted_bound" in ordered.columns and ordered["adjusted_bound"].is_not_null().any()
    if tested:
        end = "high end" if rules.get("threshold_on") == "high_end" else "low end"
        rows = [(y, score, bound) for y, score, bound in zip(at, ordered["score"], ordered["adjusted_bound"])
                if bound is not None and score is not None]
        for y, score, bound in rows:
            ax.plot([score, bound], [y + 0.3, y + 0.3], color="tab:red", linewidth=1.5)
        ax.scatter([b for _, _, b in rows], [y + 0.3 for y, _, _ in rows], marker="|", s=120, color="tab:red",
                   zorder=3, label=f"Holm-adjusted {end}: what the keep rule compared with min_score")
        if rules.get("min_score") is not None and rules["min_score"] != 0:
            ax.axvline(rules["min_score"], color="tab:red", linestyle="--", linewidth=0.8,
                       label=f"min_score {rules['min_score']}")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
    meaning = SCORE_MEANING.get(method, "estimated target-loss reduction against the average group")
    shown = "±95% interval; red: the Holm-adjusted bound tested" if tested else "±95% interval"
    ax.set_xlabel(textwrap.fill(f"{method} score: {meaning} ({shown})", 55))
    ax.set_title("Groups (green: selected)")
    if tested:  # below the axis label, where it hides no bar
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()
    return fig


def plot_sources(sources: pl.DataFrame) -> bytes:
    plt = _pyplot()

    names = sources["source"].to_list()
    fig, (rows_ax, tokens_ax) = plt.subplots(1, 2, figsize=(10, 0.4 * len(names) + 1.5), sharey=True)
    left = [0] * len(names)
    for column, color in (("selected", "tab:green"), ("not_selected", "tab:gray"), ("rejected", "tab:red")):
        values = sources[column].to_list()
        rows_ax.barh(names, values, left=left, color=color, label=column.replace("_", " "))
        left = [a + b for a, b in zip(left, values)]
    rows_ax.set_xlabel("examples")
    rows_ax.legend(fontsize=8, loc="lower right")
    tokens_ax.barh(names, sources["tokens_selected"].to_list(), color="tab:green", label="selected")
    tokens_ax.barh(names, sources["tokens_dropped"].to_list(), left=sources["tokens_selected"].to_list(),
                   color="tab:gray", label="dropped")
    tokens_ax.set_xlabel("tokens")
    fig.suptitle("Examples and tokens per source")
    fig.tight_layout()
    return _png(fig)


def plot_verify(results: pl.DataFrame, title: str | None = None) -> bytes:
    """Estimated against true target loss per fine-tuned subset: the one plot of verify's results,
    drawn for `dataselect verify` (scatter.png) and for the report."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 4))
    random = results.filter(pl.col("subset").str.starts_with("random"))
    other = results.filter(~pl.col("subset").str.starts_with("random"))
    ax.scatter(random["estimate"], random["true_loss"], label="random subsets", color="tab:blue")
    ax.scatter(other["estimate"], other["true_loss"], marker="D", color="tab:red", label="selected / not selected")
    ax.set_xlabel("estimated target loss after fine-tuning (nats/token)")
    ax.set_ylabel("target loss after a real fine-tune")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_candidates(candidates: pl.DataFrame) -> bytes:
    """Each candidate trained in full: its validation loss against the one predicted for it from the
    other candidates (leave one out), with the prediction's 90% interval; the diagonal is a perfect
    prediction."""
    plt = _pyplot()

    measured = candidates.filter(pl.col("validation_loss").is_not_null() & pl.col("predicted").is_not_null())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar(measured["predicted"].to_list(), measured["validation_loss"].to_list(),
                xerr=measured["predicted_interval90"].to_list(), fmt="o", capsize=3, color="tab:blue")
    for name, x, y in measured.select("candidate", "predicted", "validation_loss").iter_rows():
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if measured.height:
        low = min(measured["predicted"].min(), measured["validation_loss"].min())
        high = max(measured["predicted"].max(), measured["validation_loss"].max())
        ax.plot([low, high], [low, high], color="gray", linewidth=0.8)
    ax.set_xlabel("predicted validation loss (from the other candidates; 90% interval)")
    ax.set_ylabel("measured validation loss")
    ax.set_title("Candidate mixtures: predicted against measured")
    fig.tight_layout()
    return _png(fig)


def _markdown_table(frame: pl.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.width]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def _html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(text(v))}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report(output_dir: Path) -> dict:
    """Write the report for the build in `output_dir`; returns the paths written."""
    output_dir = Path(output_dir)
    manifest = read_manifest(output_dir)
    groups, sources = group_table(manifest), source_table(manifest)
    verified = verify_results(manifest)
    method = manifest["recipe"]["select"]["method"]
    candidates = candidate_table(manifest)
    rules = manifest["stages"]["select"].get("rules")
    plots = {"scores.png": plot_scores(groups, method, rules), "sources.png": plot_sources(sources)}
    if candidates is not None:
        plots["candidates.png"] = plot_candidates(candidates)
    if verified is not None:
        plots["verify.png"] = plot_verify(verified)
    tables = {"Sources": sources, "Groups": groups}
    if candidates is not None:
        tables["Candidate mixtures (the confirm stage)"] = candidates
    steady = stability_table(manifest)
    if steady is not None:
        tables["Stability"] = steady
    if verified is not None:
        tables["Estimates against real fine-tunes (dataselect verify)"] = verified.select(
            "subset", "groups", "examples", "estimate", "true_loss")

    folder = output_dir / "report"
    folder.mkdir(exist_ok=True)
    for name, data in plots.items():
        (folder / name).write_bytes(data)
    mixture = manifest["mixture"]
    title = f"dataselect report: {manifest['recipe']['name']}"
    intro = (f"{mixture['rows']} rows selected for target {manifest['recipe']['target']['name']} "
             f"(fingerprint {mixture['fingerprint']}), method {manifest['recipe']['select']['method']}. "
             + (confirm_sentence(manifest) or ""))
    md = [f"# {title}", "", intro, ""]
    md += [f"![{name}]({name})" for name in plots] + [""]
    for heading, frame in tables.items():
        md += [f"## {heading}", "", _markdown_table(frame), ""]
    prose = {heading: found for heading, found in ((DUPLICATES, duplicates_section(manifest)),
                                                   (REJECTIONS, rejections_section(output_dir, manifest)),
                                                   (CLUSTERS, clusters_section(manifest)))
             if found is not None}  # sections of a sentence and tables
    for heading, (note, frames) in prose.items():
        md += [f"## {heading}", "", note, ""] + [line for f in frames for line in (_markdown_table(f), "")]
    (folder / "summary.md").write_text("\n".join(md))
    images = "".join(f'<img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}">' for n, d in plots.items())
    sections = "".join(f"<h2>{html.escape(h)}</h2>{_html_table(f)}" for h, f in tables.items())
    for heading, (note, frames) in prose.items():
        sections += (f"<h2>{html.escape(heading)}</h2><p>{html.escape(note)}</p>"
                     + "".join(f"<p>{_html_table(f)}</p>" for f in frames))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:100%;display:block;margin:1em 0}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
            f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{images}{sections}"
            "</body></html>")
    (folder / "index.html").write_text(page)
    return {"html": str(folder / "index.html"), "markdown": str(folder / "summary.md"), "plots": sorted(plots)}
