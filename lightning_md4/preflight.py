"""What ``md4`` does before a run starts: check the command line without torch, and hold
Lightning's banner until the run starts.

torch and Lightning take seconds to import (up to half a minute on a busy machine), so the
mistakes that can be seen in the command line and its files are refused first, in one
``md4: error:`` line: a ``--config`` that is missing, a directory or not YAML (with its file,
line and column), a ``--ckpt_path`` that is missing or a directory, a method or data module that
does not exist (with the choices), an unknown section (``--eval_draw``) and an unknown option of
the method or data module (``--model.init_args.schedul``), read from the class's source without
importing it. Whatever needs the classes themselves (a value's type, a Trainer option) is left
to LightningCLI.

Lightning prints its banner ("Seed set to 0", "GPU available: ...") as it builds the run; a
value refused after that (a data file that is missing, a checkpoint of another model) would
follow those lines. :class:`HeldBanner` keeps Lightning's log lines and warnings until the run
starts (the data module is set up), and drops them when the run fails before.
"""

from __future__ import annotations

import ast
import difflib
import logging
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from lightning_md4.commands import UsageError
from lightning_md4.modules.registry import method_names, methods
from lightning_md4.paths import not_a_file

ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGE = "datamodules"
# The top-level options of md4 fit|validate|test: LightningCLI's and those MD4CLI adds
# (tests/test_preflight.py compares them with `md4 fit --help`).
SECTIONS = ("config", "print_config", "help", "seed_everything", "trainer", "model", "data", "optimizer",
            "lr_scheduler", "ckpt_path", "weights_only", "eval_draws", "eval_T", "random_weights", "strict_resume")
CHECKPOINT_WORDS = ("last", "best", "null")


def option_values(argv: list[str], *options: str) -> list[str]:
    """The values given to any of ``options`` as ``--option VALUE`` or ``--option=VALUE``, in order."""
    values = []
    for i, arg in enumerate(argv):
        if arg in options and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif "=" in arg and arg.split("=", 1)[0] in options:
            values.append(arg.split("=", 1)[1])
    return values


def check_command_line(argv: list[str], lightning_commands: Any = ("fit", "validate", "test")) -> None:
    """Refuse, without importing torch, what can be seen to be wrong in ``md4 ARGV``."""
    if not argv or argv[0] not in lightning_commands:
        for value in option_values(argv, "--config"):  # the checkpoint commands: their --config files
            read_config(value)
        return
    command, args = argv[0], argv[1:]
    if "-h" in args or "--help" in args:
        return
    for value in option_values(args, "--ckpt_path"):
        if value not in CHECKPOINT_WORDS and not Path(value).is_file():
            raise UsageError(f"--ckpt_path {value}: checkpoint {value} {not_a_file(value)}; pass a .ckpt file of "
                             "md4 fit, or last or best for the run's newest or best")
    Options(command).check(args)


def read_config(value: str) -> Any:
    """The contents of a ``--config``: a YAML file or, as jsonargparse allows, YAML text itself."""
    path = Path(value).expanduser()
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(value)
    elif path.is_dir():
        raise UsageError(f"--config {value} is a directory, not a YAML file")
    else:
        text, where = value, None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        if where is None:
            raise UsageError(f"--config {value} does not exist") from None
        raise UsageError(yaml_error_line(where, err)) from None
    if where is None and not isinstance(content, dict):  # a path, not YAML text
        raise UsageError(f"--config {value} does not exist")
    if content is not None and not isinstance(content, dict):
        raise UsageError(f"--config {value}: expected a mapping of options (trainer:, model:, data:, ...), "
                         f"found a {type(content).__name__}")
    return content or {}


def yaml_error_line(path: str, err: yaml.YAMLError) -> str:
    """``FILE, line L, column C: PROBLEM (CONTEXT at line L')`` for a YAML syntax error."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return f"--config {path} is not valid YAML: {problem}"
    line = f"--config {path}, line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        line += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{line}; not valid YAML"


class Options:
    """The options of one ``md4 fit|validate|test`` command line, walked in the order LightningCLI
    applies them: each ``--config`` file, then each option; ``--model NAME`` (or a config's
    ``class_path``) switches the class whose options later keys are checked against."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.current: dict[str, str | None] = {"model": None, "data": None}

    def check(self, args: list[str]) -> None:
        i = 0
        while i < len(args):
            arg = args[i]
            if not arg.startswith("-"):
                i += 1
                continue
            name, has_value, value = arg.lstrip("-").partition("=")
            if not has_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            i += 1
            if name in ("c", "config"):
                self.config(read_config(value), value)
            else:
                self.option(name, value)

    def unknown(self, where: str, key: str, known: Any, owner: str) -> UsageError:
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return UsageError(f"{where}: {owner} has no option {key}{hint} (md4 {self.command} --help lists the options)")

    def option(self, name: str, value: str) -> None:
        name = name.rstrip("+")  # --trainer.callbacks+=...
        section, _, rest = name.partition(".")
        if section not in SECTIONS:
            raise self.unknown(f"--{name}", section, SECTIONS, f"md4 {self.command}")
        if section not in self.current or rest in ("help", "dict_kwargs") or rest.startswith("help"):
            return
        if not rest or rest == "class_path":
            self.choose(section, value, f"--{name}")
            return
        key = rest.removeprefix("init_args.").split(".")[0]
        if key and key != "init_args":
            self.key(section, key, f"--{name}")

    def config(self, content: dict[str, Any], file: str) -> None:
        for section, value in content.items():
            if section not in SECTIONS:
                close = difflib.get_close_matches(str(section), SECTIONS, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise UsageError(f"--config {file}: md4 {self.command} has no section {section}{hint}")
            if section not in self.current:
                continue
            if isinstance(value, str):
                self.choose(section, value, f"{section}: in {file}")
            elif isinstance(value, dict):
                if isinstance(value.get("class_path"), str):
                    self.choose(section, value["class_path"], f"{section}.class_path in {file}")
                for key in value.get("init_args") or {}:
                    self.key(section, str(key), f"--config {file}: {section}.init_args.{key}")

    def choose(self, section: str, value: str, where: str) -> None:
        """``--model NAME``/``--data NAME`` (or a class path of this project): it must exist."""
        names = method_names() if section == "model" else data_module_names()
        package = "lightning_md4.modules" if section == "model" else DATA_PACKAGE
        name = value.rsplit(".", 1)[-1]
        if not (value.isidentifier() or value.startswith(f"{package}.")):
            self.current[section] = None  # a class of its own, a YAML string: LightningCLI reads it
            return
        if name not in (names if value.isidentifier() or section == "model" else data_classes()):
            what = "a method" if section == "model" else "a data module"
            raise UsageError(f"{where} {value} is not {what}; choose one of {', '.join(names)}")
        self.current[section] = name

    def key(self, section: str, key: str, where: str) -> None:
        """``key`` must be an option of the class in effect, when its options can be read."""
        name = self.current[section]
        known = None if name is None else (method_options(name) if section == "model" else data_options(name))
        if known is not None and key not in known:
            raise self.unknown(where, key, known, name)


def options_epilog() -> str:
    """The end of ``md4 fit|validate|test --help``: where the options of the methods and data modules
    are listed (they depend on the class chosen, so the list above shows only --model and --data)."""
    methods_, data = method_names(), data_module_names()
    method = "MD4" if "MD4" in methods_ else methods_[0]
    datum = "DigitsDataModule" if "DigitsDataModule" in data else data[0]
    return (f"Model and data options: each method and data module has its own; --model.help {method} lists "
            f"a method's (methods: {', '.join(methods_)}) and --data.help {datum} a data module's (data modules: "
            f"{', '.join(data)}). Set one as --model.init_args.NAME VALUE, e.g. --model.init_args.schedule cosine. "
            "--config FILE --print_config prints every option of a config with its value.")


# -- the classes' options, from their source ----------------------------------------------------
@cache
def _classes(folder: Path, package: str) -> dict[str, tuple[str, ast.ClassDef]]:
    """Every class defined in the files of ``folder``: name -> (dotted module, its definition)."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module = package if path.stem == "__init__" else f"{package}.{path.stem}"
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, (module, node))
    return found


def _bases(node: ast.ClassDef) -> Iterator[str]:
    for base in node.bases:
        yield base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")


def _init_options(node: ast.ClassDef) -> tuple[str, ...] | None:
    """The keyword options of the class's own ``__init__``; None when it has none or takes ``**kwargs``
    (its options are then its bases', which this does not follow)."""
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            if item.args.kwarg is not None:
                return None
            return tuple(a.arg for a in (*item.args.posonlyargs, *item.args.args, *item.args.kwonlyargs)
                         if a.arg != "self")
    return None


@cache
def data_classes() -> tuple[str, ...]:
    """Every subclass of ``TokenDataModule`` in ``datamodules/`` (a class path may name any of them)."""
    classes = _classes(ROOT / DATA_PACKAGE, DATA_PACKAGE)
    found, grew = {"TokenDataModule"}, True
    while grew:
        new = {name for name, (_, node) in classes.items() if set(_bases(node)) & found} - found
        found |= new
        grew = bool(new)
    return tuple(sorted(found))


@cache
def data_module_names() -> tuple[str, ...]:
    """The data modules ``--data NAME`` takes: those ``datamodules`` exports (LightningCLI resolves a
    bare name among the imported classes), less the bases that other data modules subclass."""
    classes = _classes(ROOT / DATA_PACKAGE, DATA_PACKAGE)
    tree = ast.parse((ROOT / DATA_PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    exported = next((ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and any(getattr(target, "id", "") == "__all__" for target in node.targets)), [])
    bases = {base for name in data_classes() if name in classes for base in _bases(classes[name][1])}
    return tuple(name for name in exported if name in data_classes() and name not in bases)


def data_options(name: str) -> tuple[str, ...] | None:
    entry = _classes(ROOT / DATA_PACKAGE, DATA_PACKAGE).get(name)
    return None if entry is None else _init_options(entry[1])


def method_options(name: str) -> tuple[str, ...] | None:
    for method in methods():
        if method.name == name and method.module.startswith("lightning_md4.modules."):
            entry = _classes(Path(__file__).resolve().parent / "modules", "lightning_md4.modules").get(name)
            return None if entry is None else _init_options(entry[1])
    return None


# -- Lightning's banner, held until the run starts -------------------------------------------------
BANNER_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")


class _Keep(logging.Handler):
    """A log handler that keeps each record in a list."""

    def __init__(self, kept: list[Any]) -> None:
        super().__init__(logging.NOTSET)
        self.kept = kept

    def emit(self, record: logging.LogRecord) -> None:
        self.kept.append(record)


class HeldBanner:
    """Lightning's log lines and Python's warnings, held in order from :meth:`hold` until
    :meth:`release` (the run has started: they are shown) or :meth:`drop` (the run failed before
    it started: only the error is shown)."""

    def __init__(self) -> None:
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}
        self.held: list[logging.LogRecord | tuple[Any, ...]] = []  # a log record, or a warning's arguments
        self.showwarning: Any = None

    def hold(self) -> HeldBanner:
        keep = _Keep(self.held)
        for name in BANNER_LOGGERS:
            logger = logging.getLogger(name)
            self.saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [keep], False
        self.showwarning = warnings.showwarning
        warnings.showwarning = lambda *args: self.held.append(args)
        return self

    def drop(self) -> None:
        """Stop holding and forget what was held."""
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        self.saved = {}
        if self.showwarning is not None:
            warnings.showwarning, self.showwarning = self.showwarning, None
        self.held = []

    def release(self) -> None:
        """Show what was held and stop holding (a second call does nothing)."""
        held = self.held
        self.drop()
        for item in held:
            if isinstance(item, logging.LogRecord):
                logging.getLogger(item.name).handle(item)
            else:
                warnings.showwarning(*item)

    def callback(self) -> Any:
        """A Lightning callback that releases the banner once the data module is set up (the
        Trainer calls the callbacks' ``setup`` after the data module's)."""
        from lightning.pytorch.callbacks import Callback

        held = self

        class ReleaseBanner(Callback):
            def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
                held.release()

        return ReleaseBanner()
