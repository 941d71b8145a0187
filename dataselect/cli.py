"""The `dataselect` command: a thin layer over `dataselect.pipeline.run`."""

from __future__ import annotations

import json
import logging
import os

import click

from .export import ExportError
from .model import ModelError
from .pipeline import STAGE_NAMES as STAGE_ORDER
from .pipeline import STAGES, run
from .recipe import SELECT_METHODS, RecipeError, load_recipe
from .sources import SourceError

USER_ERRORS = (RecipeError, SourceError, ModelError, ExportError)


def _options(f):
    f = click.option("--quiet", "-q", is_flag=True, help="Only print the result (no progress bars or logs).")(f)
    f = click.option("--force", is_flag=True, help="Rerun every stage even if a finished one matches the recipe.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe setting, e.g. --set estimate.subsets=200 or "
                          "--set sources.0.dataset=./data/cot.jsonl (value parsed as YAML).")(f)
    f = click.option("--recipe", "-r", required=True, type=click.Path(dir_okay=False),
                     help="Recipe YAML file (see README, 'Recipe reference').")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dataselect")
def main() -> None:
    """Choose a fine-tuning mixture from many data sources for one target task.

    Stages, in order: ingest → meta-init → sketch → estimate → select → export. Each stage
    command runs the stages before it too, reusing any that already finished for the same
    recipe settings; `build` runs them all.
    """


def _make_command(name: str, until: str, about: str) -> click.Command:
    @click.command(name=name, help=about)
    @_options
    def command(recipe: str, overrides: tuple[str, ...], force: bool, quiet: bool, method: str | None = None) -> None:
        _setup_logging(quiet)
        if method:
            overrides = (*overrides, f"select.method={method}")
        try:
            summaries = run(load_recipe(recipe, overrides), until=until, force=force)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
        _report(until, summaries, quiet)

    if STAGE_ORDER.index(until) >= STAGE_ORDER.index("select"):
        command = click.option(
            "--method", type=click.Choice(SELECT_METHODS),
            help="Selector (same as --set select.method=...): random_ensemble and forward (GradEx), surrogate, "
                 "or a baseline: all, random, gradient_similarity (LESS-style), representation_similarity, dsir.",
        )(command)
    return command


def _setup_logging(quiet: bool) -> None:
    if quiet:
        import datasets
        import transformers

        os.environ["TQDM_DISABLE"] = "1"
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="dataselect: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "filelock", "urllib3", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _report(until: str, summaries: dict, quiet: bool) -> None:
    if until == "export":
        out = summaries["export"]
        click.echo(f"mixture: {out['rows']} rows written to {out['path']} (fingerprint {out['fingerprint']})")
        click.echo(f"manifest: {out['path']}/manifest.json")
    elif not quiet:
        click.echo(json.dumps(summaries[until], indent=2))


@main.command()
@_options
@click.option("--subsets", "k_random", default=8, show_default=True,
              help="How many of the estimate stage's random subsets to fine-tune for real (plus the selection "
                   "and its complement).")
def verify(recipe: str, overrides: tuple[str, ...], force: bool, quiet: bool, k_random: int) -> None:
    """Fine-tune for real on a few subsets and compare with the estimates (correlations, errors,
    first-order check, scatter plot, radius calibration) in runs/<name>/verify/."""
    from .verify import verify as run_verify

    _setup_logging(quiet)
    try:
        loaded = load_recipe(recipe, overrides)
        if force:
            run(loaded, until="select", force=True)
        summary = run_verify(loaded, k_random)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(summary, indent=2) if not quiet else f"verify: {loaded.run_dir / 'verify'}")


main.add_command(_make_command("build", "export", "Run every stage and write the selected mixture (the usual entry point)."))
for _stage in STAGES:
    main.add_command(_make_command(_stage.name.replace("_", "-"), _stage.name,
                                   f"Run the stages up to {_stage.name}: {_stage.about}."))


if __name__ == "__main__":
    main()
