"""`dataselect push`: publish a finished output folder as a Hugging Face Hub dataset repo.

What goes up: every file under `data/` (the mixture as parquet shards and/or jsonl, per split),
`manifest.json`, `rows.parquet`, `USAGE.md` when present, and a generated `README.md` dataset
card (front matter with `configs:` so `load_dataset` finds the splits, then what was selected
and why). The `save_to_disk` copy (arrow files, state.json, ...) stays local: the Hub's loaders
read the `data/` files, and the arrow copy would double the upload.

It all goes in one commit through `huggingface_hub` (`create_repo` then `create_commit`), so
the card is uploaded from memory and the user's folder is never written to. Repos are private
unless asked otherwise, and the token is only handed to huggingface_hub, never logged.
"""

from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from .artifacts import MANIFEST, ROWS, USAGE
from .errors import UserError
from .outputs import cell, read_manifest

CARD = "README.md"
DATA_DIR = "data"
EXTRA_FILES = (MANIFEST, ROWS, USAGE)  # uploaded when present, beside data/
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
SPLIT_ORDER = ("train", "validation", "test")
RECORDED_VERSIONS = ("python", "dataselect", "torch", "transformers", "datasets")


class PushError(UserError, RuntimeError):
    """A push that cannot go ahead, with a message naming why."""


# --- what is uploaded ---


def data_files(output_dir: Path) -> list[Path]:
    """The mixture files under data/ (relative), skipping hidden ones such as editor or OS litter."""
    root = Path(output_dir)
    found = [p.relative_to(root) for p in (root / DATA_DIR).rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.as_posix())


def files_to_upload(output_dir: Path) -> list[Path]:
    """Relative paths of the folder's files that are pushed; the generated README.md is added on top."""
    read_manifest(output_dir)
    data = data_files(output_dir)
    if not data:
        raise PushError(f"{output_dir} has no mixture files under {DATA_DIR}/ to push; "
                        "rebuild it with this version of dataselect")
    extras = [Path(name) for name in EXTRA_FILES if (Path(output_dir) / name).is_file()]
    return data + extras


# --- the dataset card ---


def split_patterns(files: list[Path]) -> dict[str, str]:
    """split -> data_files pattern, from names like data/train-00000-of-00002.parquet or data/train.jsonl.

    Parquet wins when both formats were written: the Hub's viewer and loaders read it fastest.
    """
    by_ext: dict[str, dict[str, list[str]]] = {}
    for f in files:
        if f.parts[0] == DATA_DIR and f.suffix in (".parquet", ".jsonl"):
            split = re.split(r"[-.]", f.name, maxsplit=1)[0]
            by_ext.setdefault(f.suffix, {}).setdefault(split, []).append(f.name)
    chosen = by_ext.get(".parquet") or by_ext.get(".jsonl") or {}
    order = sorted(chosen, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    patterns = {}
    for split in order:
        names = chosen[split]
        ext = Path(names[0]).suffix
        single = len(names) == 1 and names[0] == f"{split}{ext}"
        patterns[split] = f"{DATA_DIR}/{split}{ext}" if single else f"{DATA_DIR}/{split}-*{ext}"
    return patterns


def front_matter(patterns: dict[str, str]) -> str:
    """The card's YAML header: tags for discovery and `configs` so load_dataset maps files to splits."""
    meta: dict[str, Any] = {"license": "other", "tags": ["dataselect", "data-selection"]}
    if patterns:
        meta["configs"] = [{"config_name": "default",
                            "data_files": [{"split": s, "path": p} for s, p in patterns.items()]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def versions(manifest: dict) -> dict[str, str]:
    """Versions as recorded in the manifest; those it lacks are the current ones, marked as such."""
    recorded = manifest.get("versions") or {}
    out = {}
    for name in RECORDED_VERSIONS:
        if name == "dataselect" and manifest.get("version"):
            out[name] = str(manifest["version"])
        elif recorded.get(name):
            out[name] = str(recorded[name])
        else:
            out[name] = f"{_installed_version(name)} (at push time)"
    return out


def _installed_version(name: str) -> str:
    if name == "python":
        return platform.python_version()
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def sources_table(manifest: dict) -> list[str]:
    lines = ["| source | rows | selected | not selected | rejected |", "|---|---:|---:|---:|---:|"]
    for name, c in manifest.get("sources", {}).items():
        lines.append(f"| {cell(name)} | {c.get('rows', 0)} | {c.get('selected', 0)} | "
                     f"{c.get('not_selected', 0)} | {c.get('rejected', 0)} |")
    return lines


def groups_table(manifest: dict) -> list[str]:
    groups = sorted(manifest.get("groups", []), key=lambda g: (g.get("rank") is None, g.get("rank") or 0))
    lines = ["| rank | group | source | score ± ci95 | examples | selected | reason |",
             "|---:|---|---|---|---:|---|---|"]
    for g in groups:
        score = cell(g.get("score"), 4)
        if g.get("ci95") is not None:
            score += f" ± {cell(g['ci95'], 2)}"
        cells = [g.get("rank"), g.get("group"), g.get("source"), score, g.get("examples"),
                 bool(g.get("selected")), g.get("reason")]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def intro(manifest: dict, patterns: dict[str, str]) -> list[str]:
    """What the mixture is, in a few lines, before the tables."""
    recipe, mixture = manifest.get("recipe") or {}, manifest.get("mixture") or {}
    target = (recipe.get("target") or {}).get("name", "target")
    method = (recipe.get("select") or {}).get("method", "?")
    groups = manifest.get("groups", [])
    selected = sum(1 for g in groups if g.get("selected"))
    summary = (f"A fine-tuning mixture chosen by [dataselect](https://pypi.org/project/dataselect/) for the target "
               f"task **{target}**: {mixture.get('rows', '?')} rows from {len(manifest.get('sources', {}))} "
               f"sources, keeping {selected} of {len(groups)} groups (method `{method}`).")
    return [
        f"# {recipe.get('name', 'dataselect')} mixture",
        "",
        summary,
        "",
        f"- rows: {mixture.get('rows', '?')}",
        f"- columns: {', '.join(mixture.get('columns', [])) or '?'}",
        f"- fingerprint: `{mixture.get('fingerprint', '?')}`",
        f"- splits: {', '.join(f'{s} (`{p}`)' for s, p in patterns.items()) or 'none'}",
        "",
        ("`manifest.json` holds the full record (stage summaries, every score); `rows.parquet` says, for "
         "every input row, whether it was selected, not selected, or rejected and why."),
    ]


def dataset_card(output_dir: Path, *, repo_id: str | None = None) -> str:
    """The README.md for the repo: how to load it, what was selected and why, and how to rebuild it."""
    manifest = read_manifest(output_dir)
    recipe = manifest.get("recipe") or {}
    patterns = split_patterns(data_files(output_dir))
    load_id = repo_id or "<user>/<dataset>"
    install = f"pip install dataselect=={manifest['version']}" if manifest.get("version") else "pip install dataselect"
    lines = [
        front_matter(patterns),
        *intro(manifest, patterns),
        "",
        "## Load it",
        "",
        "```python",
        "import datasets",
        f'mixture = datasets.load_dataset("{load_id}")',
        "```",
        "",
        "## Sources",
        "",
        *sources_table(manifest),
        "",
        "## Groups",
        "",
        "Score: estimated help to the target (positive helps), with its 95% interval.",
        "",
        *groups_table(manifest),
        "",
        "## Recipe",
        "",
        "<details><summary>The resolved recipe this mixture was built from (every default filled in)</summary>",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
        "</details>",
        "",
        "## Reproduce",
        "",
        "Save the recipe above as `recipe.yaml`, then:",
        "",
        "```bash",
        install,
        f"dataselect build --recipe recipe.yaml --set seed={recipe.get('seed', 0)}",
        "```",
        "",
        "## Versions",
        "",
        *(f"- {name}: {v}" for name, v in versions(manifest).items()),
        "",
    ]
    return "\n".join(lines)


# --- the push ---


def resolve_token(token: str | None) -> str:
    """The argument, else HF_TOKEN, else the saved login; PushError when there is none."""
    from huggingface_hub import get_token  # here and below: the Hub client loads only for a push

    token = token or get_token()
    if not token:
        raise PushError(NO_TOKEN)
    return token


def plan(output_dir: Path, repo_id: str, private: bool) -> dict:
    """What a push would upload (paths and sizes, the card included) and the card: the dry run's answer."""
    output_dir = Path(output_dir)
    files = files_to_upload(output_dir)
    card = dataset_card(output_dir, repo_id=repo_id)
    listing = [{"path": f.as_posix(), "size": (output_dir / f).stat().st_size} for f in files]
    listing.append({"path": CARD, "size": len(card.encode())})
    return {"repo_id": repo_id, "private": private, "files": listing, "card": card}


def commit_message(manifest: dict) -> str:
    mixture = manifest.get("mixture") or {}
    return (f"dataselect mixture {str(mixture.get('fingerprint', ''))[:16]} "
            f"({mixture.get('rows', '?')} rows, dataselect {manifest.get('version', '?')})")


def push(output_dir: Path, repo_id: str, *, private: bool = True, token: str | None = None,
         dry_run: bool = False, endpoint: str | None = None) -> dict:
    """Upload a finished output folder to a Hub dataset repo (created if missing) in one commit.

    dry_run: no network and no token; returns what would be uploaded, with the card text.
    """
    output_dir = Path(output_dir)
    if dry_run:
        return {**plan(output_dir, repo_id, private), "dry_run": True}
    files_to_upload(output_dir)  # a folder that cannot be pushed fails before any token or network
    token = resolve_token(token)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    manifest = read_manifest(output_dir)
    api = HfApi(endpoint=endpoint, token=token, library_name="dataselect",
                library_version=str(manifest.get("version", "")))
    try:
        repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        is_private = bool(api.dataset_info(repo.repo_id).private)
        if private and not is_private:
            raise PushError(f"{repo.repo_id} already exists and is public; nothing was uploaded. Push it as "
                            "public explicitly (private=False) or choose another repo id")
        operations = _operations(output_dir, repo.repo_id)
        commit = api.create_commit(repo.repo_id, operations, repo_type="dataset",
                                   commit_message=commit_message(manifest),
                                   commit_description=f"Pushed from {output_dir.name} with `dataselect push`.")
    except HfHubHTTPError as err:
        raise PushError(f"push to {repo_id} failed: {err}") from err
    except _connection_errors() as err:
        raise PushError(f"push to {repo_id} failed: cannot reach {api.endpoint} ({err})") from err
    files = [{"path": op.path_in_repo, "size": op.upload_info.size} for op in operations]
    return {"repo_id": repo.repo_id, "private": is_private, "files": files, "url": str(repo),
            "commit_url": commit.commit_url, "commit": commit.oid, "dry_run": False}


def _operations(output_dir: Path, repo_id: str) -> list:
    """One CommitOperationAdd per file, the card from memory (named for the repo as the Hub resolved it)."""
    from huggingface_hub import CommitOperationAdd

    card = dataset_card(output_dir, repo_id=repo_id).encode()
    added = [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(output_dir / f))
             for f in files_to_upload(output_dir)]
    return [*added, CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card)]


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's errors for an unreachable Hub (huggingface_hub 2.x sends through httpx2)."""
    try:
        import httpx2
    except ImportError:  # another huggingface_hub major version: let its errors through unchanged
        return ()
    return (httpx2.TransportError,)
