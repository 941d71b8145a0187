"""The `dataselect` command: a thin layer over `dataselect.pipeline.run`.

Its commands come from the stage table (`pipeline.STAGES`) and the selectors' registry, which load
no torch; the modules that do (the stages, verify, report) are imported when a command runs, so
`dataselect --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import build, selectors
from .artifacts import MANIFEST, key_file
from .errors import UserError
from .outputs import read_manifest
from .pipeline import STAGE_BY_NAME, STAGES, Stage, is_finished, run, run_shard, stage_keys

if TYPE_CHECKING:
    from .recipe import Recipe
    from .shards import Shard

# OSError: a full disk, a missing permission; its message names the file.
USER_ERRORS = (UserError, OSError)
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def _output_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print the command's result as JSON, for scripts.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="Only print the result (no progress bars or logs).")(f)
    return f


def _options(f):
    f = _output_options(f)
    f = click.option("--force", is_flag=True, help="Rerun every stage even if a finished one matches the recipe.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe setting, e.g. --set estimate.subsets=200 or "
                          "--set sources.0.dataset=./data/cot.jsonl (value parsed as YAML).")(f)
    f = click.option("--recipe", "-r", required=True, type=click.Path(dir_okay=False),
                     help="Recipe YAML file (every key: docs/recipes.md, 'Recipe reference').")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dataselect")
def main() -> None:
    """Choose a fine-tuning mixture from many data sources for one target task.

    Stages, in order: ingest → meta-init → sketch → estimate → select → export. Each stage
    command runs the stages before it too, reusing any that already finished for the same
    recipe settings; `build` runs them all.
    """


def _make_command(name: str, until: Stage, about: str) -> click.Command:
    """A command that runs the stages up to `until`; its options follow from the stages it runs:
    --shard where `until` can be sharded, --method once a stage that reads `select` runs, and
    --overwrite and the push for the last stage, which writes the output."""
    runs = STAGES[: STAGES.index(until) + 1]
    writes_output = until is STAGES[-1]

    @click.command(name=name, help=about)
    @_options
    def command(recipe: str, overrides: tuple[str, ...], force: bool, quiet: bool, as_json: bool,
                method: str | None = None, shard: str | None = None, overwrite: bool = False) -> None:
        from .recipe import load_recipe

        _setup_logging(quiet or as_json)
        again = _same_command(name, recipe, overrides, method=method, shard=shard, overwrite=overwrite)
        if method:
            overrides = (*overrides, f"select.method={method}")
        if overwrite:
            overrides = (*overrides, "output.overwrite=true")
        loaded = None
        try:
            loaded = load_recipe(recipe, overrides)
            if shard:
                summaries = {until.name: run_shard(loaded, _parse_shard(shard))}
            elif writes_output:
                summaries = build(loaded, force=force)
            else:
                summaries = run(loaded, until=until.name, force=force)
            if not summaries:  # a non-zero rank under torchrun: rank 0 reports
                return
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            _interrupted(loaded, runs, again, force)
        if as_json:
            click.echo(json.dumps(summaries, indent=2, default=str))
        else:
            _report(until.name, summaries, quiet, writes_output)

    if until.shards is not None:
        command = click.option(
            "--shard", metavar="I/N",
            help="Sketch only shard I of N (0 ≤ I < N) as an independent job, e.g. a Slurm array task; "
                 "a later `build` merges the shards once all N have finished. Needs a finished meta-init.",
        )(command)
    if writes_output:
        command = click.option(
            "--overwrite", is_flag=True,
            help="Replace output.path even if it holds something other than an earlier dataselect output.",
        )(command)
    if any("select" in stage.settings for stage in runs):
        command = click.option(
            "--method", type=click.Choice(selectors.METHOD_NAMES),
            help=f"Selector (same as --set select.method=...; default group_effect); {selectors.listing()}.",
        )(command)
    return command


def _same_command(name: str, recipe: str, overrides: Sequence[str], **options: str | int | bool | None) -> str:
    """The command as the user typed it (without --force, -q, --json): what resumes it."""
    words = ["dataselect", name, "-r", recipe, *(w for o in overrides for w in ("--set", o))]
    for option, value in options.items():
        if value is not None and value is not False:
            words += [f"--{option}"] if value is True else [f"--{option}", str(value)]
    return shlex.join(words)


def _interrupted(recipe: Recipe | None, stages: Sequence[Stage], again: str, force: bool,
                 after: str | None = None) -> None:
    """Ctrl-C: say what was kept and how to resume, instead of click's bare "Aborted!", and exit
    130. Nothing is lost that a rerun could reuse: a finished stage is kept whole, and an
    unfinished one keeps its folder, from which it resumes what it can; `after`: what the command
    runs once its stages are done (verify's fine-tunes)."""
    say = lambda text="": click.echo(text, err=True)  # noqa: E731
    say()
    if recipe is None:
        say("Interrupted before anything started.")
        raise click.exceptions.Exit(INTERRUPTED)
    keys = stage_keys(recipe)
    finished = [s.name for s in stages if is_finished(recipe, s.name, keys[s.name])]
    cut = next((s.name for s in stages if s.name not in finished), None)
    during = cut or after
    say(f"Interrupted{f' during {during}' if during else ''}.")
    if finished:
        say(f"Kept: {', '.join(finished)}, finished in {recipe.run_dir}; a rerun reuses "
            f"{'it' if len(finished) == 1 else 'them'}.")
    if cut:
        unfinished = recipe.run.unfinished_dir(cut)
        marker = key_file(unfinished)
        started = marker.exists() and marker.read_text() == keys[cut] and any(
            p != marker for p in unfinished.iterdir())
        if started:
            say(f"Kept: {cut}'s work so far, in {unfinished}; a rerun resumes from it where the stage keeps its "
                "progress (meta-init from its last checkpoint, sketching from its last finished chunk) and starts "
                "it over otherwise.")
        else:
            say(f"{cut} had written nothing to keep; a rerun starts it.")
    finetunes = recipe.run.finetunes
    if finetunes.is_dir() and any(finetunes.iterdir()):
        say(f"Kept: the real fine-tunes in {finetunes} (the confirm stage and verify reuse them; an unfinished one "
            "continues from its checkpoint).")
    without = " without --force (which would start every stage over)" if force else ""
    say(f"Resume with the same command{without}: {again}")
    raise click.exceptions.Exit(INTERRUPTED)


def _parse_shard(text: str) -> Shard:
    from .shards import Shard  # torch.distributed: only for a shard job

    try:
        return Shard.parse(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard") from None


def _setup_logging(quiet: bool) -> None:
    if quiet:
        import datasets  # datasets and transformers take seconds to import: only to silence them
        import transformers

        os.environ["TQDM_DISABLE"] = "1"
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="dataselect: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "filelock", "urllib3", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _keep_rule_lines(summaries: dict) -> list[str]:
    """What the keep rule decided, in a few lines: how many groups it kept, the closest call on each
    side of min_score with the number it tested, how much evidence the scores held, and the ingest
    stage's warnings about the sizes behind them."""
    lines = [f"warning: {w}" for w in (summaries.get("ingest") or {}).get("warnings") or []]
    select = summaries.get("select")
    if not select:
        return lines
    rules = select["rules"]
    lines.append(f"keep rule: {select['groups_selected']} of {select['groups']} groups ({select['method']}, threshold_on "
                 f"{rules['threshold_on']}, min_score {rules['min_score']})")
    calls = select.get("closest_calls") or {}
    words = {"passed": "cleared by", "failed": "missed by"}
    shown = [f"{words[side]} {c['group']} ({c['tested']} {c['value']:.3g}" + (f", level {c['at']})" if c["at"] else ")")
             for side, c in calls.items() if c]
    if shown:
        lines.append(f"  closest calls, min_score {rules['min_score']}: " + "; ".join(shown))
    found = select.get("evidence")
    if found:
        lines.append(f"evidence: {found['note']}" if found.get("weak") else
                     f"evidence: {found['confidently_above']} groups confidently above min_score {rules['min_score']}, "
                     f"{found['confidently_below']} confidently below (Holm over {found['groups_tested']} groups, "
                     f"{found['validation_rows']} validation rows)")
    return lines


def _report(until: str, summaries: dict, quiet: bool, wrote_output: bool) -> None:
    if wrote_output:
        out = summaries[until]
        confirm = summaries.get("confirm") or {}
        for line in _keep_rule_lines(summaries):
            click.echo(line)
        if confirm.get("confirmed"):
            click.echo(f"confirmed: '{confirm['chosen']}', validation loss {confirm['validation_loss']:.4f} against all "
                       f"sources' {confirm['all_sources_validation_loss']:.4f} ({confirm['candidates']} candidates, "
                       f"{confirm['cost']:.2f} full fine-tunes)")
            if confirm.get("predicted_validation_loss") is not None:
                click.echo(f"predicted for a retrain: {confirm['predicted_validation_loss']:.4f} ± "
                           f"{confirm['predicted_interval90']:.3f} (90%)")
            elif confirm.get("no_prediction"):
                click.echo(f"no predicted loss: {confirm['no_prediction']}")
        click.echo(f"mixture: {out['rows']} rows written to {out['path']} (fingerprint {out['fingerprint']})")
        click.echo(f"manifest: {out['path']}/{MANIFEST}")
        if "push" in summaries:
            push = summaries["push"]
            click.echo(f"pushed to {push['repo_id']} ({'private' if push['private'] else 'public'})")
    elif not quiet:
        click.echo(json.dumps(summaries[until], indent=2))


@main.command()
@_options
@click.option("--subsets", "k_random", type=int,
              help="How many of the estimate stage's random subsets to fine-tune for real (plus the selection "
                   "and its complement)  [default: 8; 2 with --quick]")
@click.option("--repeats", type=int,
              help="How many of those subsets to fine-tune again with the next seed, to measure the truth's own "
                   "noise  [default: 3; 1 with --quick]")
@click.option("--quick", is_flag=True,
              help="A first look: 2 random subsets, 1 repeat, every fine-tune stopped at half its steps (noisier; "
                   "its fine-tunes are continued by a later full verify), written to runs/<name>/verify-quick/.")
def verify(recipe: str, overrides: tuple[str, ...], force: bool, quiet: bool, as_json: bool, k_random: int | None,
           repeats: int | None, quick: bool) -> None:
    """Fine-tune for real on a few subsets and compare with the estimates (correlations, errors,
    the similarity baselines, the truth's own noise, scatter plot) in runs/<name>/verify/; print
    a verdict in words and the files written. Its cost is said before the fine-tunes start."""
    from .recipe import load_recipe
    from .verify import FULL, QUICK, quick_folder
    from .verify import verify as run_verify

    _setup_logging(quiet or as_json)
    again = _same_command("verify", recipe, overrides, subsets=k_random, repeats=repeats, quick=quick)
    defaults = QUICK if quick else FULL
    loaded = None
    try:
        loaded = load_recipe(recipe, overrides)
        folder = quick_folder(loaded) if quick else loaded.run.verification
        announce = (lambda text: None) if quiet or as_json else (lambda text: click.echo(text, err=True))
        summary = run_verify(loaded, defaults["k_random"] if k_random is None else k_random,
                             defaults["repeats"] if repeats is None else repeats, out=folder.folder, force=force,
                             until=defaults["until"], announce=announce)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        _interrupted(loaded, STAGES[: STAGES.index(STAGE_BY_NAME["select"]) + 1], again, force,
                     after="verify's fine-tunes")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"verdict: {summary['verdict']['text']}")
    click.echo(f"report:  {folder.report}")
    click.echo(f"plot:    {folder.scatter}")
    click.echo(f"results: {folder.results_file} (per subset: estimate, true loss, baselines; {folder.summary_file.name} "
               "beside it)")


@main.command()
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@_output_options
def report(output: Path, quiet: bool, as_json: bool) -> None:
    """Write OUTPUT/report/index.html (self-contained, with plots) and summary.md for a finished build."""
    from .report import report as write_report

    _setup_logging(quiet or as_json)
    try:
        written = write_report(output)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(written, indent=2) if as_json else f"report: {written['html']}")


@main.command()
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo-id", help="Dataset repo to upload to (default: the manifest's output.push_to_hub).")
@click.option("--public", is_flag=True, help="Create the repo public (default: private, unless the recipe says so).")
@click.option("--dry-run", is_flag=True, help="Show the files and dataset card that would be uploaded; send nothing.")
@_output_options
def push(output: Path, repo_id: str | None, public: bool, dry_run: bool, quiet: bool, as_json: bool) -> None:
    """Upload a finished build in OUTPUT to the Hugging Face Hub with a generated dataset card.

    The token comes from HF_TOKEN or `hf auth login`, never from the command line."""
    from .push import PushError
    from .push import push as upload

    _setup_logging(quiet or as_json)
    try:
        spec = read_manifest(output)["recipe"]["output"]
        repo_id = repo_id or spec.get("push_to_hub")
        if not repo_id:
            raise PushError("no repo to push to: pass --repo-id or set output.push_to_hub in the recipe")
        result = upload(output, repo_id, private=not public and spec.get("private", True), dry_run=dry_run)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif dry_run:
        click.echo(f"would upload to {repo_id} ({'private' if result['private'] else 'public'}):")
        for f in result["files"]:
            click.echo(f"  {f['path']}  {f['size']} bytes" if isinstance(f, dict) else f"  {f}")
        if not quiet:
            click.echo("\n--- README.md (dataset card) ---\n" + result["card"])
    else:
        click.echo(f"pushed {len(result['files'])} files to {repo_id} ({'private' if result['private'] else 'public'})")


main.add_command(_make_command("build", STAGES[-1], "Run every stage and write the selected mixture (the usual entry point)."))
for _stage in STAGES:
    main.add_command(_make_command(_stage.name.replace("_", "-"), _stage,
                                   f"Run the stages up to {_stage.name}: {_stage.about}."))


if __name__ == "__main__":
    main()
