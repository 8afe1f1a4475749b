"""Settings declared once: each a dataclass field made with :func:`option`.

A setting's declaration (default, help, choices, bounds, metavar, flag) gives the Python
API's checks (:func:`check_settings`, called in ``__post_init__``), the ``argparse``
options (:func:`add_options`), the values from parsed arguments
(:func:`settings_from_args`) and the README's option tables (:func:`option_table`, which a
test compares with the README).

Messages name a setting as the API spells it (```batch_size` must be at least 1; received
batch_size=0``); a command line shows the same :class:`SettingError` with its flags
(``--batch-size must be at least 1; received --batch-size 0``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

_FIELD_REFERENCE = re.compile(r"\{(\w+)\}")


class SettingError(ValueError):
    """A setting that breaks its rule.

    Args:
        rule: what must hold, with settings written ``{name}``:
            ``"{size} must be at least 8"``.
        **received: the values received, by setting name.
    """

    def __init__(self, rule: str, **received):
        self.rule = rule
        self.received = received
        super().__init__(self.render())

    def render(self, flags: dict[str, str] | None = None) -> str:
        """The message; with ``flags`` (setting name -> flag), as a command line names them.

        >>> SettingError("{size} must be at least 8", size=4).render()
        '`size` must be at least 8; received size=4'
        >>> SettingError("{size} must be at least 8", size=4).render({"size": "--size"})
        '--size must be at least 8; received --size 4'
        """
        if flags is None:
            name, value = (lambda n: f"`{n}`"), (lambda n, v: f"{n}={v!r}")
        else:
            name = lambda n: flags.get(n, f"`{n}`")  # noqa: E731
            value = lambda n, v: f"{flags[n]} {_flag_value(v)}" if n in flags else f"{n}={v!r}"  # noqa: E731
        text = _FIELD_REFERENCE.sub(lambda match: name(match.group(1)), self.rule)
        if self.received:
            text += "; received " + ", ".join(value(n, v) for n, v in self.received.items())
        return text


def _flag_value(value) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    choices: tuple | None = None,
    at_least: float | None = None,
    below: float | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    short: str | None = None,
    default_text: str | None = None,
    group: str | None = None,
    kind: type | None = None,
    const: Any = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the default value.
        help: what the option means, one line (the default is added to ``--help``).
        default_factory: computes the default instead (e.g. from the CPU count).
        choices: the allowed values.
        at_least: the smallest allowed value.
        below: every value must be below this.
        metavar: the placeholder in ``--help``.
        flag: the option's flag; defaults to ``--`` and the name with dashes.
        short: a one-letter flag as well (``-o``).
        default_text: how ``--help`` and the README write the default, where its value
            does not say it (None, a computed default).
        group: the heading it is listed under in ``--help``.
        kind: the type of its values, where the default (None) does not tell it.
        const: the value of the flag given without a value (``--augment`` alone), which
            then takes an optional value (``--augment flip``).
    """
    metadata = {
        "help": help,
        "choices": choices,
        "at_least": at_least,
        "below": below,
        "metavar": metavar,
        "flag": flag,
        "short": short,
        "default_text": default_text,
        "group": group,
        "kind": kind,
        "const": const,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _options(cls) -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def _kind(field: dataclasses.Field) -> type:
    """The type of one value of the field: int, float, str or bool."""
    if field.metadata["kind"] is not None:
        return field.metadata["kind"]
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    if isinstance(default, tuple | list):
        return type(default[0]) if default else str
    return type(default)


def _is_sequence(field: dataclasses.Field) -> bool:
    return "tuple" in str(field.type)


def check_settings(settings) -> None:
    """Check every field of a settings dataclass against its declaration.

    A path (``os.PathLike``) given for a text setting is kept as its ``str``.

    Raises:
        TypeError: a value of the wrong type.
        SettingError: a value outside its choices or bounds.
    """
    for field in _options(settings):
        value = getattr(settings, field.name)
        if value is None and field.default is None:
            continue
        if isinstance(value, os.PathLike) and _kind(field) is str:  # a path: kept as its str
            value = os.fspath(value)
            object.__setattr__(settings, field.name, value)
        values = list(value) if _is_sequence(field) else [value]
        kind = _kind(field)
        for item in values:
            wrong = isinstance(item, bool) and kind is not bool
            if wrong or not isinstance(item, int | float if kind is float else kind):
                raise TypeError(
                    f"`{field.name}` must be {kind.__name__}; received {field.name}={value!r}"
                )
            _check_value(field, item, value)


def _check_value(field: dataclasses.Field, item, value) -> None:
    meta = field.metadata
    if meta["choices"] is not None and item not in meta["choices"]:
        choices = ", ".join(map(str, meta["choices"]))
        raise SettingError(f"{{{field.name}}} must be one of {choices}", **{field.name: value})
    low, high = meta["at_least"], meta["below"]
    if (low is not None and item < low) or (high is not None and item >= high):
        if low is not None and high is not None:
            rule = f"must be in [{low:g}, {high:g})"
        elif low is not None:
            rule = f"must be at least {low:g}"
        else:
            rule = f"must be below {high:g}"
        raise SettingError(f"{{{field.name}}} {rule}", **{field.name: value})


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a settings field."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def _default_text(field: dataclasses.Field) -> str:
    meta = field.metadata
    if meta["default_text"] is not None:
        return meta["default_text"]
    default = field.default
    if default is dataclasses.MISSING:
        default = field.default_factory()
    if isinstance(default, bool):
        return "off"
    if isinstance(default, tuple | list):
        return " ".join(map(str, default))
    if isinstance(default, float):
        return f"{default:g}"
    return "none" if default is None else str(default)


def add_options(
    parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None
) -> dict[str, str]:
    """Add one option per field of the settings dataclass ``cls``.

    Args:
        parser: the parser.
        cls: a dataclass whose fields were declared with :func:`option`.
        only: the names of the fields to add. Defaults to every field.

    Returns:
        Setting name -> flag, for :meth:`SettingError.render`.
    """
    groups: dict[str | None, Any] = {None: parser}
    flags = {}
    for field in _options(cls):
        if only is not None and field.name not in only:
            continue
        meta = field.metadata
        title = meta["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        names = [*([meta["short"]] if meta["short"] else []), flag_of(field)]
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        kind = _kind(field)
        if kind is bool:
            kwargs["action"] = "store_true"
            kwargs["help"] = meta["help"]
        else:
            kwargs["type"] = kind
            kwargs["help"] = f"{meta['help']} (default: {_default_text(field)})"
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["metavar"] = meta["metavar"] or field.name.upper()
            if _is_sequence(field):
                kwargs["nargs"] = "+"
            elif meta["const"] is not None:
                kwargs["nargs"] = "?"
                kwargs["const"] = meta["const"]
        groups[title].add_argument(*names, **kwargs)
        flags[field.name] = flag_of(field)
    return flags


def settings_from_args(cls, args: argparse.Namespace, **more):
    """The settings dataclass ``cls`` from parsed arguments: given options, else the defaults.

    Raises:
        SettingError: a value outside its rule.
    """
    given = {
        field.name: getattr(args, field.name)
        for field in _options(cls)
        if hasattr(args, field.name)
    }
    for field in _options(cls):
        if _is_sequence(field) and field.name in given:
            given[field.name] = tuple(given[field.name])
    return cls(**given, **more)


def option_table(parser: argparse.ArgumentParser) -> str:
    """The parser's options as a Markdown table: option, default, meaning.

    The README's option tables are this function's output (a test compares them).
    """
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:  # argparse keeps no public list
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings)
        if action.choices:
            choices = "\\|".join(map(str, action.choices))
            name += f" [{choices}]" if action.nargs == "?" else f" {choices}"
        elif action.metavar:
            name += f" {action.metavar}"
            if action.nargs == "+":
                name += " ..."
        meaning = action.help or ""
        match = re.fullmatch(r"(.*) \(default: (.*)\)", meaning)
        if isinstance(action, argparse._StoreTrueAction):
            default = "off"
        elif action.required:
            default = "required"
        elif match:
            meaning, default = match.groups()
        else:
            default = "none"
        lines.append(f"| `{name}` | {default} | {meaning} |")
    return "\n".join(lines)
