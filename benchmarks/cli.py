"""``key=value`` command lines over a dataclass, as the project's Hydra entry points take them.

Each suite describes its settings as a dataclass whose fields carry a ``help`` text
(:func:`option`); :func:`parse` merges, in this order, the dataclass defaults, the suite's presets
(e.g. the larger CUDA sizes, the ``quick=true`` sizes) and the command line
(``OmegaConf.from_dotlist``), so what is given on the command line always wins. Values are YAML:
``size=[64,96]``, ``quick=true``, ``overrides=[model.selection.detach_features=true]``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
Presets = Callable[[Any], Sequence[Mapping[str, Any]]]
HELP_WORDS = ("-h", "--help", "help")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help line (printed by ``help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def lists_to_tuples(settings: Any) -> None:
    """Turns every list field of a settings dataclass into a tuple (YAML gives lists; the settings are
    frozen-style values, hashed and compared as tuples). Called from each suite's ``__post_init__``."""
    for f in dataclasses.fields(settings):
        if isinstance(getattr(settings, f.name), list):
            setattr(settings, f.name, tuple(getattr(settings, f.name)))


def usage(schema: type, prog: str, summary: str = "") -> str:
    """Every key of ``schema`` with its default and help line."""
    lines = [f"usage: {prog} [key=value ...]"]
    if summary:
        lines += ["", summary]
    lines += ["", "keys (default):"]
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name}={_show(default)}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A default as it is written on the command line: ``[512,853]``, ``true``, ``null``."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def parse(schema: type[T], argv: Sequence[str], *, prog: str, summary: str = "", presets: Presets | None = None) -> T:
    """``argv`` (``key=value`` items) -> an instance of the dataclass ``schema``.

    Args:
        presets: called with the defaults merged with the command line (a typed config), returns the
            mappings laid between the defaults and the command line.

    Raises:
        SystemExit: 0 after printing the keys for ``help`` / ``-h`` / ``--help``; 2 with one line on
            stderr for an item without ``=``, an unknown key, a value of the wrong type or one the
            dataclass rejects (a ``ValueError`` of its ``__post_init__``).
    """
    argv = list(argv)
    if any(a in HELP_WORDS for a in argv):
        print(usage(schema, prog, summary))
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        _fail(prog, f"expected key=value items (e.g. device=cuda), got {' '.join(bad)}; `{prog} help` lists the keys")
    try:
        base = OmegaConf.structured(schema)
        cli = OmegaConf.from_dotlist(argv)
        layers: list[DictConfig] = [base]
        if presets is not None:
            layers += [OmegaConf.create(dict(p)) for p in presets(OmegaConf.merge(base, cli))]
        merged = OmegaConf.merge(*layers, cli)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (OmegaConfBaseException, ValueError) as err:
        _fail(prog, str(err).splitlines()[0] + f"; `{prog} help` lists the keys")
    raise AssertionError("unreachable")


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
