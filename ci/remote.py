"""The CI script's checks of the DVC remote (ci/repro.sh): is it reachable, and what did a pull not bring.

    python ci/remote.py check            # one line; exit 2 when the default remote cannot be reached
    python ci/remote.py missing [--strict]  # the dvc.lock outputs still absent after `dvc pull`; --strict: exit 3

Only reads: it never deletes or changes a file in the workspace.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import typer
import yaml

app = typer.Typer(add_completion=False, help=__doc__)


def default_remote() -> tuple[str, str]:
    """The default remote's name and URL (``.dvc/config`` and ``.dvc/config.local``)."""
    from dvc.repo import Repo

    config = Repo(".").config
    name = config["core"].get("remote")
    if not name:
        raise typer.Exit(_fail("no default DVC remote: add one with `dvc remote add -d <name> <url>`", 2))
    return name, str(config["remote"][name]["url"])


def _fail(message: str, code: int) -> int:
    typer.echo(f"error: {message}", err=True)
    return code


def reachable(name: str, url: str) -> str | None:
    """Why the remote cannot be reached, or None when it can (an absent local folder is an empty store)."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(url).path if scheme else url)
        path = path if path.is_absolute() else (Path(".dvc") / path).resolve()  # DVC: relative to .dvc/
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
        parent = next(p for p in [path, *path.parents] if p.exists())
        if not path.exists() and not (parent.is_dir() and _writable(parent)):
            return f"{path} does not exist and cannot be created"
        return None
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15)
        except urllib.error.HTTPError:
            return None  # the server answered
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        return None
    from dvc.repo import Repo

    remote = Repo(".").cloud.get_remote(name)
    try:
        remote.fs.exists(remote.path)
    except Exception as exc:  # noqa: BLE001 -- credentials, network, bucket: one line either way
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK)


@app.command()
def check() -> None:
    """Exit 2 with one line naming the remote when it cannot be reached."""
    name, url = default_remote()
    why = reachable(name, url)
    if why:
        raise typer.Exit(_fail(f"DVC remote '{name}' ({url}) is unreachable: {why}; nothing was pulled or changed", 2))
    run_cache = urlparse(url).scheme not in ("http", "https")
    typer.echo(f"remote '{name}' ({url}) reachable{'' if run_cache else '; HTTP: no run-cache (DVC limitation)'}")


@app.command()
def missing(strict: bool = typer.Option(False, help="Exit 3 when outputs are missing, instead of a note.")) -> None:
    """Name the dvc.lock outputs absent from the workspace after ``dvc pull`` (what the remote lacks)."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        typer.echo("no dvc.lock: every stage runs")
        return
    outs = sorted({o["path"] for st in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values()
                   for o in st.get("outs", [])})
    absent = [p for p in outs if not Path(p).exists()]
    if not absent:
        typer.echo(f"all {len(outs)} outputs of dvc.lock are here")
        return
    name, url = default_remote()
    shown = ", ".join(absent[:8]) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
    message = f"DVC remote '{name}' ({url}) lacks {len(absent)} of {len(outs)} outputs of dvc.lock: {shown}"
    if strict:
        raise typer.Exit(_fail(message, 3))
    typer.echo(f"note: {message}; dvc repro rebuilds them")


if __name__ == "__main__":
    sys.exit(app())
