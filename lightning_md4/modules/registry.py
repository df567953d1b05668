"""The methods, each registered once, in its own file of this package, by a class decorator::

    @register_method(process="lightning_md4.diffusion.masked", state_spaces=("absorbing",),
                     samplers=("ancestral",), summary="masked diffusion, fixed schedule")
    class MD4(DiffusionModule): ...

Everything that lists methods reads this registry: ``md4 --help`` and the ``--model`` check
(:mod:`lightning_md4.cli`), the TensorBoard HPARAMS entry (``run_hparams``), the evaluation options
``md4 validate``/``test`` take from the command line, the checkpoint upgrade, the benchmarks' method
list and the contract test (``tests/test_contract.py``), which checks every registered method. A
new method is one file here (its math in ``lightning_md4/diffusion/`` if new) and one config.

What a method declares (:class:`Method`): its name (the class name, which ``--model NAME`` takes),
where its math lives, the state spaces and samplers it supports (a list of more than one names the
values of its constructor option of the same name, ``state_space`` or ``sampler``, the first being
the default), the state spaces in which its optimal denoiser depends on t (there the network always
sees t) and its evaluation options. What a method computes is on its class: ``schedule_summary``
(run_hparams' schedule column) and ``upgrade_hparams`` (the checkpoint upgrade hook).

Torch-free: ``md4 --help`` needs the names without importing torch, so :func:`methods` reads the
decorators' arguments from the source of this package's files (they must be literals), and
imports a method's file only when its class is asked for (:attr:`Method.cls`). A class registered
elsewhere (a test's throwaway method) is added by the decorator when it runs.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE = "lightning_md4.modules"
HERE = Path(__file__).resolve().parent
# Options each method has unless it declares otherwise: ``md4 validate``/``test`` take them from the
# command line over the checkpoint's (they change how a checkpoint is scored, not the model it holds).
DEFAULT_EVAL_OPTIONS = ("eval_seed",)
# A capability listed with more than one value is chosen by the constructor option of this name.
OPTION_OF = {"state_spaces": "state_space", "samplers": "sampler"}


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: the class name; ``--model NAME``.
        module: the dotted module of its file, e.g. ``lightning_md4.modules.md4``.
        process: the dotted module of its math, e.g. ``lightning_md4.diffusion.masked``.
        state_spaces: ``absorbing``, ``uniform`` (see :mod:`lightning_md4.diffusion.base`) or
            ``causal`` (left to right, no noise); the first is the default.
        samplers: the names of its samplers, the default first (``ancestral``: the process's
            reverse step on a time grid; ``left-to-right``: one token per network evaluation).
        time_dependent: the state spaces in which the optimal denoiser depends on t, so the
            network always sees t (``True``: all of them).
        eval_options: the options ``md4 validate``/``test`` take from the command line.
        summary: one line for ``md4 --help``.
    """

    name: str
    module: str
    process: str
    state_spaces: tuple[str, ...]
    samplers: tuple[str, ...]
    time_dependent: bool | tuple[str, ...] = False
    eval_options: tuple[str, ...] = DEFAULT_EVAL_OPTIONS
    summary: str = ""
    _cls: type | None = field(default=None, compare=False, repr=False)

    @property
    def cls(self) -> type:
        """The LightningModule class (imports its file, and with it torch)."""
        if self._cls is not None:
            return self._cls
        return getattr(importlib.import_module(self.module), self.name)

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def posterior_depends_on_time(self, state_space: str | None = None) -> bool:
        """Whether the optimal denoiser changes with t at a fixed x_t in ``state_space`` (default: the first)."""
        if isinstance(self.time_dependent, bool):
            return self.time_dependent
        return (state_space or self.state_spaces[0]) in self.time_dependent

    def variants(self) -> list[dict[str, str]]:
        """Every combination of the capabilities listed with more than one value, as constructor
        options: ``[{}]`` for a method with one state space and one sampler."""
        combos: list[dict[str, str]] = [{}]
        for attribute, option in OPTION_OF.items():
            values = getattr(self, attribute)
            if len(values) > 1:
                combos = [{**combo, option: value} for combo in combos for value in values]
        return combos

    def capabilities(self) -> str:
        """What it supports, in words, for ``md4 --help``."""
        parts = [f"state space {' or '.join(self.state_spaces)}", f"sampler {' or '.join(self.samplers)}"]
        if self.time_dependent:
            where = "" if self.time_dependent is True else f" ({' or '.join(self.time_dependent)})"
            parts.append(f"network sees t{where}")
        return "; ".join(parts)


_runtime: dict[str, Method] = {}  # registered by the decorator as classes are defined (this package's and others')


def register_method(*, process: str, state_spaces: tuple[str, ...], samplers: tuple[str, ...],
                    time_dependent: bool | tuple[str, ...] = False,
                    eval_options: tuple[str, ...] = DEFAULT_EVAL_OPTIONS, summary: str = "") -> Any:
    """Class decorator: register the method (see :class:`Method`); the name is the class's.

    Checks what can be checked without building it: a capability listed with more than one value
    is a constructor option whose ``Literal`` choices are that list; every evaluation option is a
    constructor option. In this package's files every argument must be a literal (module docstring).
    """

    def decorate(cls: type) -> type:
        method = Method(name=cls.__name__, module=cls.__module__, process=process, state_spaces=tuple(state_spaces),
                        samplers=tuple(samplers), time_dependent=_time_dependent(time_dependent),
                        eval_options=tuple(eval_options), summary=summary, _cls=cls)
        _check(method, cls)
        known = _runtime.get(method.name)
        if known is not None and known._cls is not None and known._cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {method.name} is registered twice ({known.class_path} and {method.class_path})")
        _runtime[method.name] = method
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method registered at run time (a test's throwaway method)."""
    _runtime.pop(name, None)


def methods() -> list[Method]:
    """Every registered method: this package's files (in file-name order), then those registered elsewhere."""
    found = {m.name: _runtime.get(m.name, m) for m in _package_methods()}
    found.update({name: m for name, m in _runtime.items() if name not in found})
    return list(found.values())


def method_names() -> list[str]:
    return [m.name for m in methods()]


def get_method(name: str) -> Method:
    """The method called ``name``; a ``KeyError`` that lists the methods otherwise."""
    for m in methods():
        if m.name == name:
            return m
    raise KeyError(f"{name} is not a method; choose one of {', '.join(method_names())}")


def method_of(cls_or_model: Any) -> Method | None:
    """The registered method of a class or model: its own, or its nearest registered base's."""
    cls = cls_or_model if isinstance(cls_or_model, type) else type(cls_or_model)
    by_name = {m.name: m for m in methods()}
    for klass in cls.__mro__:
        m = by_name.get(klass.__name__)
        if m is not None and (m._cls is klass or (m._cls is None and klass.__module__ == m.module)):
            return m
    return None


def load_all() -> list[type]:
    """Import every method's class (jsonargparse resolves ``--model NAME`` among the imported subclasses)."""
    return [m.cls for m in methods()]


# -- reading this package's files without importing them ---------------------------------------
@cache
def _package_methods() -> tuple[Method, ...]:
    return tuple(m for path in sorted(HERE.glob("*.py")) for m in _methods_in(path))


def _methods_in(path: Path) -> Iterator[Method]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and _called(decorator.func) == "register_method":
                try:
                    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in decorator.keywords}
                except ValueError:
                    raise ValueError(f"{path.name}: the arguments of @register_method on {node.name} must be "
                                     "literals (md4 --help reads them without importing the file)") from None
                kwargs["time_dependent"] = _time_dependent(kwargs.get("time_dependent", False))
                kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
                yield Method(name=node.name, module=f"{PACKAGE}.{path.stem}", **kwargs)


def _called(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _time_dependent(value: bool | tuple[str, ...] | list[str]) -> bool | tuple[str, ...]:
    return value if isinstance(value, bool) else tuple(value)


def _check(method: Method, cls: type) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__) if parameters else {}
    for attribute, option in OPTION_OF.items():
        values = getattr(method, attribute)
        if not values:
            raise ValueError(f"{method.name}: register_method needs at least one of {attribute}")
        if len(values) == 1:
            continue
        if option not in parameters:
            raise ValueError(f"{method.name} lists {attribute} {values}, so its constructor must take {option}=")
        choices = set(typing.get_args(hints.get(option))) - {None}
        if choices and choices != set(values):
            raise ValueError(f"{method.name}: {attribute} {values} differ from the choices of {option}, "
                             f"{sorted(choices)}")
        if parameters[option].default != values[0]:
            raise ValueError(f"{method.name}: the first of {attribute} {values} must be {option}'s default, "
                             f"{parameters[option].default!r}")
    missing = [name for name in method.eval_options if name not in parameters]
    if missing:
        raise ValueError(f"{method.name}: evaluation options {missing} are not options of its constructor")
    extra = set(method.time_dependent) - set(method.state_spaces) if isinstance(method.time_dependent, tuple) else ()
    if extra:
        raise ValueError(f"{method.name}: time_dependent names {sorted(extra)}, not among its state spaces")
