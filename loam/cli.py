"""One command-line style: configs through absl + ml_collections, user errors as one line.

Every command that takes `--config` calls `config_main`; every command prints a user error as
one `error: …` line on stderr and exits 1 (`fail`, `user_errors`). A user error is anything the
user can fix: a bad config, a missing file, a damaged checkpoint (`UserError`, ValueError,
OSError). Anything else is a bug in loam and keeps its traceback.

This module imports no JAX: checkpoint, workdir and the configs build on it.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import functools
import importlib.util
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

CONFIG_HELP = ("a get_config(arg) file, e.g. loam/configs/default.py[:arg], or a resolved "
               "config.json")
_HELP = ("-h", "--help", "--helpshort", "--helpfull")


class UserError(Exception):
    """A problem the user can fix; the message names it and the fix (printed as one line)."""


USER_ERRORS = (UserError, ValueError, OSError)


def one_line(message) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message) -> NoReturn:
    """Prints `error: {message}` (as one line) to stderr and exits 1."""
    sys.stdout.flush()
    print(f"error: {one_line(message) or 'failed'}", file=sys.stderr, flush=True)
    sys.exit(1)


@contextlib.contextmanager
def user_errors():
    """Turns a user error raised inside the block into one `error:` line and exit 1."""
    try:
        yield
    except BrokenPipeError:  # output piped into e.g. `head`, which has closed it: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except USER_ERRORS as e:
        fail(_describe(e))


def _describe(e: BaseException) -> str:
    text = one_line(e)
    if isinstance(e, KeyError) and len(e.args) == 1:  # str(KeyError) is the repr of the key
        text = one_line(e.args[0])
    return text or type(e).__name__


def quiet_logs():
    """absl logging at WARNING: orbax otherwise logs every file it writes."""
    absl_logging.set_verbosity(absl_logging.WARNING)


# --------------------------------------------------------------------------- loading configs

def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of `--config FILE[:ARG]`: get_config(ARG) of a Python file, or a JSON file
    (a resolved config, as runs and proposals write them). Raises UserError with one line."""
    path, sep, arg = spec.partition(":")
    file = Path(path)
    if not path or not file.is_file():
        raise UserError(f"config file {path!r} does not exist; pass --config {CONFIG_HELP}")
    if file.suffix == ".json":
        if sep:
            raise UserError(f"{path} is a resolved JSON config and takes no ':{arg}'; change "
                            "fields with --config.KEY=VALUE instead")
        return _load_json(file)
    try:
        code = compile(file.read_bytes(), str(file), "exec")
    except SyntaxError as e:
        raise UserError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}; "
                        "fix the file") from None
    name = f"loam_config_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None:
        raise UserError(f"config file {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as ml_collections does: dataclasses and pickling need it
    try:
        exec(code, module.__dict__)
    except Exception as e:  # noqa: BLE001 - the user's file; say where it failed
        raise UserError(f"config file {path} failed to load: {_where(e, file)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {path} has no get_config(arg) function; define one that "
                        "returns an ml_collections.ConfigDict")
    try:
        config = module.get_config(arg) if sep else module.get_config()
    except (UserError, ValueError) as e:  # the configs' parse_arg: unknown or bad :arg
        raise UserError(f"--config {spec}: {_describe(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--config {spec}: get_config failed: {_where(e, file)}") from None
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config in {path} returned {type(config).__name__}, not an "
                        "ml_collections.ConfigDict (a missing return statement?)")
    return config


def _load_json(file: Path) -> ml_collections.ConfigDict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config file {file} is not valid JSON (line {e.lineno}, column "
                        f"{e.colno}: {e.msg}); fix it or regenerate it") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {file} holds a JSON {type(data).__name__}, not an object "
                        "of config fields")
    return ml_collections.ConfigDict(data)


def _where(e: BaseException, file: Path) -> str:
    """`Type: message (file:line)`, the line being the innermost frame in the config file."""
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve() == file.resolve():
            line = frame.lineno
    at = f" ({file}:{line})" if line else ""
    return f"{type(e).__name__}: {_describe(e)}{at}"


# --------------------------------------------------------------------------- overrides

def _flag_error(e: BaseException, fv) -> str:
    text = _describe(e)
    m = re.search(r"Flag --(\S+) must have a value other than None", text)
    if m:
        return f"--{m.group(1)} is required ({fv[m.group(1)].help}); see --help"
    m = re.match(r"flag --config\.([^=]+)=", text)
    if m and "config" in fv:
        try:
            kind = type(_lookup(fv["config"].value, m.group(1))).__name__
            text += f" (config.{m.group(1)} is of type {kind})"
        except UserError:
            pass
    return text


_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+?)(?:=(.*))?$", re.S)


def _split_config_arg(args: list[str]) -> tuple[str | None, list[str]]:
    spec, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        m = re.match(r"^--?config(?:=(.*))?$", a, re.S)
        if m:
            if m.group(1) is not None:
                spec = m.group(1)
            elif i + 1 < len(args):
                spec, i = args[i + 1], i + 1
            else:
                raise UserError(f"--config needs a value: {CONFIG_HELP}")
        else:
            rest.append(a)
        i += 1
    return spec, rest


def _fields(node) -> list[str]:
    return sorted(node.keys()) if hasattr(node, "keys") else []


def _lookup(config, path: str):
    """The value at a dotted path; UserError naming the nearest known keys if it is absent."""
    node: Any = config
    done: list[str] = []
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            where = f"config.{'.'.join(done)}" if done else "the config"
            fields = _fields(node)
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f'Did you mean "{close[0]}" instead of "{part}"? ' if close else ""
            raise UserError(
                f"unknown config field --config.{path}: {where} has no field {part!r}. {hint}"
                + (f"Known fields: {', '.join(fields)}" if fields
                   else f"{where} is a {type(node).__name__}, not a section"))
        node = node[part]
        done.append(part)
    return node


def _parse_literal(text: str):
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(text) from None


def _split_overrides(config, args: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Checks every --config.PATH names a field, and takes out the overrides absl cannot apply:
    a list or dict value (absl: "Type list is not supported for overriding"), applied after
    parsing by `_apply`. Everything else stays for ml_collections to parse and type-check."""
    literal: list[tuple[str, Any]] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        m = _OVERRIDE.match(a)
        if not m:
            rest.append(a)
            i += 1
            continue
        negated, path, value = m.group(1), m.group(2), m.group(3)
        if "[" in path:  # ml_collections' own item syntax: leave it to ml_collections
            rest.append(a)
            i += 1
            continue
        current = _lookup(config, path)
        takes_value = (not negated and value is None and current is not None
                       and not isinstance(current, bool))
        if takes_value and i + 1 < len(args):  # `--config.x VALUE`
            value = args[i + 1]
            consumed = [a, args[i + 1]]
        else:
            consumed = [a]
        i += len(consumed)
        if value is None or negated:
            rest += consumed
            continue
        try:
            parsed = _parse_literal(value)
            parses = True
        except ValueError:
            parsed, parses = None, False
        is_dict = isinstance(current, (ml_collections.ConfigDict, dict))
        if isinstance(current, tuple):
            rest += consumed  # ml_collections parses tuples itself
        elif parses and isinstance(parsed, (list, dict)):
            literal.append((path, parsed))
        elif isinstance(current, list) and not parses:
            raise UserError(f"--config.{path}={value}: cannot parse the value as a list; write "
                            "a JSON or Python literal, e.g. "
                            f"--config.{path}='[\"code\",\"docs\"]'")
        elif is_dict and parses and isinstance(parsed, str):
            literal.append((path, parsed))  # a quoted string: e.g. weights -> a recipe name
        elif is_dict:
            raise UserError(
                f"--config.{path}={value}: config.{path} is a dict (fields "
                f"{', '.join(_fields(current))}); set one field (--config.{path}.KEY=VALUE), "
                f"give a whole dict literal, or replace it by a string written in quotes "
                f"(--config.{path}='\"{value}\"')")
        elif isinstance(current, list):
            raise UserError(f"--config.{path}={value}: config.{path} is a list; give a list "
                            f"literal (JSON or Python), not {value!r}")
        else:
            rest += consumed
    return literal, rest


def _apply(config, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    with config.ignore_type():  # e.g. a recipe string replaced by per-domain weights
        node[leaf] = value


class _FlagsBinder:
    """The absl `flags` module with every DEFINE_* / mark_* bound to one FlagValues, so that a
    command's `define_flags(flags)` reads like ordinary absl code and runs once per call."""

    def __init__(self, flag_values):
        self._flags, self.FLAGS = flags, flag_values

    def __getattr__(self, name):
        attr = getattr(self._flags, name)
        if name.startswith(("DEFINE", "mark_", "register_validator", "validator")):
            return functools.partial(attr, flag_values=self.FLAGS)
        return attr


def config_main(run: Callable[[ml_collections.ConfigDict, Any], Any], *,
                define_flags: Callable[[Any], None] | None = None,
                argv: list[str] | None = None):
    """Entry point of a command that takes `--config FILE[:ARG]` plus `--config.KEY=VALUE`
    overrides; calls `run(config, flags)` and returns what it returns.

    A command with extra flags::

        def _define_flags(flags):   # the absl `flags` module, bound to this command's flags
            flags.DEFINE_string("workdir", None, "Run directory.")
            flags.mark_flag_as_required("workdir")
            flags.DEFINE_string("coordinator", None, "host:port of process 0.")

        def _run(config, flags):    # flags.workdir, flags.coordinator: the parsed values
            train(config, flags.workdir)

        def main(argv=None):
            cli.config_main(_run, define_flags=_define_flags, argv=argv)

    `--config` takes a Python file (get_config(arg), as ml_collections' DEFINE_config_file) or
    a resolved `.json` config. Overrides are parsed by ml_collections (`DEFINE_config_dict`,
    locked: an unknown key is an error), except list and dict values, which ml_collections
    cannot override and which are applied here:
    `--config.data.domains='["code","docs"]'`, `--config.data.weights='{"code":1,"docs":2}'`.
    Every loading or parsing problem, and every user error `run` raises (UserError, ValueError,
    OSError), is one `error:` line and exit 1; other exceptions keep their traceback.
    Flags live in a FlagValues of their own, so this can run more than once in a process.
    """
    argv = list(sys.argv if argv is None else argv)
    prog, args = argv[0] if argv else "loam", argv[1:]
    fv = flags.FlagValues()
    binder = _FlagsBinder(fv)
    if define_flags is not None:
        define_flags(binder)
    if any(a in _HELP for a in args):
        doc = getattr(sys.modules.get(getattr(run, "__module__", "")), "__doc__", None)
        lines = [f"  --config: {CONFIG_HELP}; override fields with --config.KEY=VALUE"]
        for module, defined in fv.flags_by_module_dict().items():
            if not module.startswith("absl."):
                lines += [f"  --{f.name}: {f.help}"
                          + (f" (default: {f.default!r})" if f.default is not None else "")
                          for f in sorted(defined, key=lambda f: f.name)]
        print(((doc or "").strip() + "\n\nflags:\n" if doc else "flags:\n") + "\n".join(lines))
        sys.exit(0)
    try:
        spec, rest = _split_config_arg(args)
        if spec is None:
            raise UserError(f"--config is required: {CONFIG_HELP}")
        config = load_config(spec)
        literal, rest = _split_overrides(config, rest)
        config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, flag_values=fv,
                                        lock_config=True, sys_argv=[prog, *rest])
        leftover = fv([prog, *rest])
        if len(leftover) > 1:
            raise UserError(f"unexpected argument(s) {' '.join(leftover[1:])}; flags are "
                            "written --name=value")
        for path, value in literal:
            _apply(fv.config, path, value)
    except UserError as e:
        fail(e)
    except flags.Error as e:  # unknown flag, bad value type, missing required flag
        fail(_flag_error(e, fv))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # from ml_collections
        fail(f"cannot apply the --config overrides: {_describe(e)}")
    quiet_logs()
    with user_errors():
        return run(fv.config, fv)
