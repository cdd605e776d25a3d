"""Command-line plumbing shared by every stage: params loading, strict validation, clean errors.

Each stage is one Typer command. Its non-path options are its hyperparameters; their values come from one section of
``params.yaml`` through the ``default_map`` of Typer's context, so ``--help`` documents every key and a flag given on
the command line still wins. Paths are passed by ``dvc.yaml`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import typer
import typer.main
import yaml

__all__ = ["PipelineError", "PARAMS_OPTION", "stage_options", "read_params", "load_section", "check_keys",
           "closest_key", "check_value", "read_keys", "run_stage", "run_command", "params_option"]

PARAMS_OPTION = "params"
"""Name of the option every stage has that points at the params file."""


class PipelineError(Exception):
    """An error the user can fix (bad input, bad params, missing file): :func:`run_stage` prints it as one line on
    stderr, without a traceback, and exits with status 1."""

    exit_code = 1


def _callback(app: typer.Typer) -> Callable[..., Any]:
    if len(app.registered_commands) != 1:
        raise TypeError("a stage app must have exactly one command")
    return app.registered_commands[0].callback


def stage_options(app: typer.Typer) -> dict[str, Any]:
    """The hyperparameters of a stage: its command's arguments that are not paths, with their type annotations.

    Args:
        app: the stage's Typer application (one command).

    Returns:
        argument name (the params.yaml key) -> type annotation (``int``, ``float``, ``list[int]``,
        ``Optional[int]``...).
    """
    hints = typing.get_type_hints(_callback(app))
    return {name: hint for name, hint in hints.items() if name != "return" and hint is not Path}


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _scalar_ok(value: Any, hint: Any) -> bool:
    """True when ``value`` (as parsed by YAML) has exactly the type ``hint``: no silent int(0.5) == 0."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in [e.value for e in hint]
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(e.value) for e in hint)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_value(key: str, value: Any, hint: Any) -> None:
    """Raise a :class:`PipelineError` naming ``key`` unless ``value`` has exactly the type ``hint``."""
    hint, optional = _unwrap_optional(hint)
    if value is None and optional:
        return
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or not all(_scalar_ok(v, item) for v in value):
            raise PipelineError(f"params key '{key}' must be a list of values that are each {_type_name(item)}, "
                                f"got {value!r}")
        return
    if not _scalar_ok(value, hint):
        raise PipelineError(f"params key '{key}' must be {_type_name(hint)}{' or null' if optional else ''}, "
                            f"got {value!r} ({type(value).__name__})")


def read_params(path: Path) -> dict[str, Any]:
    """Read a params file into a dict, with a clear error when it is missing or not YAML."""
    if not path.is_file():
        raise PipelineError(f"params file {path} not found (run from the repository root, or pass --params)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PipelineError(f"params file {path} must hold a mapping of sections")
    return data


def load_section(params: dict[str, Any], section: str, apps: Sequence[typer.Typer]) -> dict[str, Any]:
    """Validate one params section against the stages that read it and return the part the first stage reads.

    Args:
        params: the whole params file.
        section: the section name, e.g. ``"autoencoder"``.
        apps: the stage whose values are wanted first, then every other stage reading this section; a key that none
            of them reads is an error (a misspelt key must never fall back silently to a default).

    Raises:
        PipelineError: the section is missing, has an unknown key, or a value of the wrong type.
    """
    if section not in params or not isinstance(params[section], dict):
        raise PipelineError(f"params section '{section}' is missing from the params file")
    values = params[section]
    known: dict[str, Any] = {}
    for app in reversed(apps):
        known.update(stage_options(app))
    check_keys(section, values, known)
    for key, value in values.items():
        check_value(f"{section}.{key}", value, known[key])
    own = stage_options(apps[0])
    missing = sorted(set(own) - set(values))
    if missing:
        raise PipelineError(f"params key(s) {', '.join(f'{section}.{k}' for k in missing)} missing from the params "
                            "file (every key of a stage's section is set there; see the stage's --help)")
    return {k: v for k, v in values.items() if k in own}


def closest_key(key: str, known: Sequence[str]) -> str | None:
    """The known key most like ``key`` (a likely misspelling), or None when none is close."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def check_keys(section: str, values: dict[str, Any], known: Sequence[str]) -> None:
    """Raise on a key of ``section`` that no stage reads, naming the closest known key.

    Raises:
        PipelineError: ``values`` holds a key that is not in ``known``.
    """
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = []
        for k in unknown:
            near = closest_key(k, known)
            hints.append(f"'{section}.{k}'" + (f" (did you mean '{section}.{near}'?)" if near else ""))
        raise PipelineError(f"unknown params key(s) {', '.join(hints)}; known keys of '{section}': "
                            f"{', '.join(sorted(known))}")


def _params_path(argv: Sequence[str]) -> Path:
    flag = "--" + PARAMS_OPTION
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith(flag + "="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def read_keys(params: Path, section: str, schema: type, reader: str,
              keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Keys of another stage's section (a stage's ``EXTRA_PARAMS``), type-checked against a typed dataclass.

    Args:
        params: the params file.
        section: the other stage's section, e.g. ``"ldm"``.
        schema: a dataclass whose field annotations give each key's type (e.g. the evaluator's ``Recipe``).
        reader: the stage that reads them, named in the error.
        keys: the keys wanted (default: every field of ``schema``); each must be there (no silent default for a
            key another stage owns).

    Raises:
        PipelineError: the section lacks a key, or a value has the wrong type.
    """
    hints = typing.get_type_hints(schema)
    keys = [f.name for f in dataclasses.fields(schema)] if keys is None else list(keys)
    values = read_params(params).get(section) or {}
    missing = [f"{section}.{k}" for k in keys if k not in values]
    if missing:
        raise PipelineError(f"params section '{section}' lacks {', '.join(missing)} (the {reader} stage reads them)")
    for key in keys:
        check_value(f"{section}.{key}", values[key], hints[key])
    return {k: values[k] for k in keys}


def command_defaults(app: typer.Typer, section: str | None, argv: Sequence[str], strict: bool) -> dict[str, Any]:
    """The command's option values from its params section: every option a key of the section sets."""
    path = _params_path(argv)
    if section is None or (not strict and not path.is_file()):
        return {}
    params = read_params(path)
    if strict:
        return load_section(params, section, [app])
    values = params.get(section) or {}
    own = stage_options(app)
    return {k: v for k, v in values.items() if k in own}


def _run(app: typer.Typer, section: str | None, argv: Sequence[str], strict: bool) -> None:
    from pipeline.core.runtime import prepare_process  # runtime imports torch; cli stays light

    prepare_process()
    prog = f"python -m pipeline.{Path(sys.argv[0]).stem}"
    try:
        defaults = command_defaults(app, section, argv, strict)
        command = typer.main.get_command(app)
        for param in command.params:  # a value from params.yaml is a default: --help must not call it required
            if param.name in defaults:
                param.required = False
        command(args=list(argv), default_map=defaults, prog_name=prog)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


def run_stage(app: typer.Typer, section: str | None, argv: Sequence[str] | None = None) -> None:
    """Entry point of a stage: load and check its params section, then run its command with the section's values as
    the options' defaults (so ``--help`` shows them; a flag on the command line still wins).

    Args:
        app: the stage's Typer app.
        section: its params section (it alone owns every key there), or None for a stage without hyperparameters.
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    strict = not any(a in ("--help", "-h") for a in argv) or _params_path(argv).is_file()
    _run(app, section, argv, strict)


def run_command(app: typer.Typer, section: str | None = None, argv: Sequence[str] | None = None) -> None:
    """Entry point of a user command outside DVC (``python -m pipeline.generate``...): its options that share a name
    with a key of ``section`` take their defaults from params.yaml (``--params``) when the file is there; a
    :class:`PipelineError` prints one ``error:`` line on stderr, without a traceback, and exits with its status."""
    _run(app, section, list(sys.argv[1:] if argv is None else argv), strict=False)


def params_option() -> Any:
    """The ``--params`` option every stage has."""
    return typer.Option(Path("params.yaml"), "--params", help="Params file; the stage reads its own section of it.",
                        exists=False, dir_okay=False)
