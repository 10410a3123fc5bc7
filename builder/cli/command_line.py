"""Check a whole `spa-vl` command line against the command's signature before the command runs.

python-fire checks late: it calls the command with what it could parse and complains about the rest
afterwards (``publish DIR REPO --dryrun`` published, then said ``Could not consume arg``). Here the
command line is read first against the ``CLI`` method's signature (names, annotations, defaults) and
the small tables below (choices and ranges a signature cannot say); a bad line raises ``UsageError``
naming the flag and the nearest valid one. The checked values then go to fire in one unambiguous
form, ``--name=<Python literal>``, so fire only dispatches::

    command = Command.of(CLI, "publish")
    values, extra = command.parse(["out/spa_vl", "org/SPA-VL", "--dry-run", "--no-private"])
    values   # {'dry_run': True, 'private': False, 'dir': 'out/spa_vl', 'repo_id': 'org/SPA-VL'}
    command.fire_argv(values, extra)   # ['publish', "--dry_run=True", "--private=False", ...]

Spellings: ``--dry_run``, ``--dry-run`` and ``--dry_run=true``; ``--no-private``, ``--no_private`` and
``--noprivate``. A command that takes ``**overrides`` (``train``) passes the flags it does not name on
unchanged; its own loader checks them. Commands added later are checked with no change here: their
signature is the contract.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from dataclasses import dataclass
from types import NoneType, UnionType

from builder.errors import DataError

# Allowed values a signature cannot say, as "module:attribute" (read when that command runs or shows
# its help, so each list has one owner). Keys: "command.parameter", or "parameter" for every command.
CHOICES = {
    "fixture.layout": "builder.dev.fixture:LAYOUTS",
    "fixture.meta_in": "builder.dev.fixture:META_PLACES",
    "configs.action": "builder.shipped:ACTIONS",
    "generate.executor": "builder.generate.pipeline:EXECUTORS",
    "generate.until": "builder.generate.pipeline:STAGES",
    "version.bump": "builder.versioning:PARTS",
    "train.kind": "training.config:KINDS",
}
BARE_WORDS = {  # commands whose optional parameters may also be given as bare words, in this order
    "configs": ("action", "name", "dest"),  # spa-vl configs copy pipeline my.yaml
}
RANGES = {  # inclusive (lowest, highest); None: unbounded
    "rows_per_domain": (0, None),
    "eval_rows": (0, None),
    "image_size": (8, None),
    "seed": (0, None),
    "limit": (1, None),
    "retries": (0, None),
    "batch_size": (1, None),
    "max_new_tokens": (1, None),
    "train.max_steps": (-1, None),
}
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")
_FLAG = re.compile(r"--.*|-[A-Za-z].*")  # "-1" and "-0.5" are values, not flags


class UsageError(DataError):
    """A command line that does not fit the command: exit code 2, nothing run."""


class HelpRequested(Exception):
    """``--help`` / ``-h``: print the help of ``command`` (None: of spa-vl) instead of running anything."""

    def __init__(self, command: "Command | None" = None):
        self.command = command
        super().__init__("help")


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type | None  # str, int, float or bool; None: unannotated (fire parses the text)
    optional: bool  # None is a valid value
    default: object
    required: bool

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def metavar(self, choices: tuple | None) -> str:
        if choices:
            return "|".join(map(str, choices))
        return {int: "N", float: "X"}.get(self.kind, self.name.upper())


@dataclass(frozen=True)
class Command:
    name: str
    doc: str
    params: tuple[Parameter, ...]
    takes_overrides: bool  # **kwargs: unknown --key value pairs are passed on, unchecked

    @classmethod
    def of(cls, cli: type, name: str) -> "Command":
        fn = getattr(cli, name)
        hints = typing.get_type_hints(fn)
        params, overrides = [], False
        for p in list(inspect.signature(fn).parameters.values())[1:]:  # [0] is self
            if p.kind is p.VAR_KEYWORD:
                overrides = True
                continue
            kind, optional = _base_type(hints.get(p.name))
            required = p.default is p.empty
            params.append(Parameter(p.name, kind, optional or p.default is None, None if required else p.default, required))
        return cls(name, inspect.cleandoc(fn.__doc__ or ""), tuple(params), overrides)

    # --- what the user may type ---------------------------------------------------------------------
    @property
    def positional(self) -> list[Parameter]:
        """Parameters a bare word may fill, in order: the required ones; with none required, a leading
        optional non-flag one (``demo [OUT]``, ``train [KIND]``)."""
        if self.name in BARE_WORDS:
            by_name = {p.name: p for p in self.params}
            return [by_name[n] for n in BARE_WORDS[self.name]]
        required = [p for p in self.params if p.required]
        if required or not self.params or self.params[0].kind is bool:
            return required
        return [self.params[0]]

    def choices(self, param: Parameter) -> tuple | None:
        ref = CHOICES.get(f"{self.name}.{param.name}") or CHOICES.get(param.name)
        if ref is None:
            return None
        module, attr = ref.split(":")
        return tuple(getattr(importlib.import_module(module), attr))

    def range(self, param: Parameter) -> tuple | None:
        return RANGES.get(f"{self.name}.{param.name}") or RANGES.get(param.name)

    def synopsis(self) -> str:
        """``spa-vl publish DIR REPO_ID [--no-private] ... [--retries N]``: the README's reference line."""
        words = [f"spa-vl {self.name}"]
        positional = self.positional
        for p in positional:
            word = p.metavar(self.choices(p)) if self.choices(p) else p.name.upper()
            words.append(word if p.required else f"[{word}]")
        for p in self.params:
            if p in positional:
                continue
            if p.kind is bool:
                words.append(f"[--no-{p.name}]" if p.default is True else f"[{p.flag}]")
            else:
                words.append(f"[{p.flag} {p.metavar(self.choices(p))}]")
        if self.takes_overrides:
            words.append("[--key value ...]")
        return " ".join(words)

    def help_text(self) -> str:
        return f"usage: {self.synopsis()}\n\n{self.doc}\n"

    # --- checking -------------------------------------------------------------------------------------
    def parse(self, argv: list[str]) -> tuple[dict, list[str]]:
        """The command line's values by parameter name, and the flags passed on to ``**overrides``."""
        if "-h" in argv or "--help" in argv:  # help wins over the rest of the line, good or bad
            raise HelpRequested(self)
        by_name = {p.name: p for p in self.params}
        values: dict[str, object] = {}
        words: list[str] = []
        after_switch: dict[int, str] = {}  # word index -> the on/off flag just before it (`--progress maybe`)
        extra: list[str] = []
        i = 0
        while i < len(argv):
            token = argv[i]
            if not _FLAG.fullmatch(token):
                prev = by_name.get(argv[i - 1][2:].partition("=")[0].replace("-", "_")) if i else None
                if prev is not None and prev.kind is bool and "=" not in argv[i - 1]:
                    after_switch[len(words)] = prev.flag
                words.append(token)
                i += 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            param, value, used = self._flag(token, nxt, by_name)
            if param is None:  # an override of a command that takes **overrides
                extra += argv[i:i + 1 + used]
            else:
                if param.name in values:
                    raise UsageError(f"{self.name}: {param.flag} is given twice")
                values[param.name] = value
            i += 1 + used
        self._place_words(words, values, after_switch)
        missing = [p for p in self.params if p.required and p.name not in values]
        if missing:
            raise UsageError(f"{self.name}: missing {', '.join(p.name.upper() for p in missing)}; "
                             f"usage: {self.synopsis()}")
        for name, value in values.items():
            self._check_value(by_name[name], value)
        return values, extra

    def _flag(self, token: str, nxt: str | None, by_name: dict) -> tuple[Parameter | None, object, int]:
        """(parameter, value, how many following tokens the value used) for one flag token."""
        if not token.startswith("--"):
            raise UsageError(f"{self.name}: unknown flag {token}; flags are spelled --name (see spa-vl {self.name} --help)")
        key, eq, text = token[2:].partition("=")
        key = key.replace("-", "_")
        param, negated = by_name.get(key), False
        if param is None and key.startswith("no"):
            base = by_name.get(key[2:].lstrip("_"))
            if base is not None and base.kind is bool:
                param, negated = base, True
        if param is None:
            if self.takes_overrides and key:
                return None, None, 0 if eq or nxt is None or _FLAG.fullmatch(nxt) else 1
            raise UsageError(self._unknown(token, key))
        if negated:
            if eq:
                raise UsageError(f"{self.name}: {token.split('=')[0]} takes no value")
            return param, False, 0
        if param.kind is bool:
            if eq:
                return param, self._convert(param, text), 0
            if nxt is not None and nxt.lower() in _TRUE + _FALSE:  # fire's `--progress False`
                return param, self._convert(param, nxt), 1
            return param, True, 0
        if eq:
            return param, self._convert(param, text), 0
        if nxt is None or _FLAG.fullmatch(nxt):
            raise UsageError(f"{self.name}: {param.flag} needs a value ({param.flag} {param.metavar(self.choices(param))})")
        return param, self._convert(param, nxt), 1

    def _unknown(self, token: str, key: str) -> str:
        spellings = {p.name: p.flag for p in self.params}
        spellings |= {f"no_{p.name}": f"--no-{p.name}" for p in self.params if p.kind is bool}
        spellings |= {f"no{p.name}": f"--no-{p.name}" for p in self.params if p.kind is bool}
        near = difflib.get_close_matches(key, list(spellings), n=1, cutoff=0.6)
        hint = f"; did you mean {spellings[near[0]]}?" if near else ""
        flags = ", ".join(f"--no-{p.name}" if p.kind is bool and p.default is True else p.flag
                          for p in self.params if p not in self.positional) or "none"
        return f"{self.name}: unknown flag {token.split('=')[0]}{hint} (its flags: {flags})"

    def _place_words(self, words: list[str], values: dict, after_switch: dict[int, str]) -> None:
        free = [p for p in self.positional if p.name not in values]
        for index, word in enumerate(words):
            if not free and index in after_switch:
                flag = after_switch[index]
                raise UsageError(f"{self.name}: {flag} is on/off and takes no value {word!r} "
                                 f"(write {flag}, {flag}=false or --no-{flag[2:]})")
            if not free:
                raise UsageError(f"{self.name}: unexpected argument {word!r}; usage: {self.synopsis()}")
            param = free.pop(0)
            values[param.name] = self._convert(param, word)

    def _convert(self, param: Parameter, text: str) -> object:
        if param.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise UsageError(f"{self.name}: {param.flag} is true or false, not {text!r}")
        if param.optional and param.kind in (int, float) and text in ("None", "none"):
            return None
        if param.kind in (int, float):
            try:
                value = param.kind(text)
            except ValueError:
                what = "an integer" if param.kind is int else "a number"
                raise UsageError(f"{self.name}: {param.flag} takes {what}, not {text!r}") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise UsageError(f"{self.name}: {param.flag} takes a finite number, not {text!r}")
            return value
        if param.kind is str and not text:
            raise UsageError(f"{self.name}: {param.flag} is empty")
        return text

    def _check_value(self, param: Parameter, value: object) -> None:
        if value is None:
            return
        choices = self.choices(param)
        if choices is not None and value not in choices:
            near = difflib.get_close_matches(str(value), list(map(str, choices)), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise UsageError(f"{self.name}: {param.flag} is one of {', '.join(map(str, choices))}, not {value!r}{hint}")
        bounds = self.range(param)
        if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = bounds
            if (low is not None and value < low) or (high is not None and value > high):
                want = f">= {low}" if high is None else f"<= {high}" if low is None else f"in {low}..{high}"
                raise UsageError(f"{self.name}: {param.flag} must be {want}, not {value}")

    def fire_argv(self, values: dict, extra: list[str]) -> list[str]:
        """The checked line in the one form fire cannot misread: ``--name=<Python literal>``."""
        out = [self.name]
        for name, value in values.items():
            param = next(p for p in self.params if p.name == name)
            out.append(f"--{name}={value}" if param.kind is None else f"--{name}={value!r}")
        return out + extra


def commands(cli: type) -> dict[str, Command]:
    """Every public method of ``cli``: those of its job classes (its bases, in order), then its own."""
    names = [name for klass in (*cli.__mro__[1:], cli) for name, fn in vars(klass).items()
             if not name.startswith("_") and inspect.isfunction(fn)]
    return {name: Command.of(cli, name) for name in dict.fromkeys(names)}


def check(cli: type, argv: list[str]) -> tuple[Command, dict, list[str]]:
    """The command a line names and its checked values; ``HelpRequested`` or ``UsageError`` otherwise."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help" and argv[1] in commands(cli):
            raise HelpRequested(Command.of(cli, argv[1]))
        raise HelpRequested(None)
    name, known = argv[0], commands(cli)
    if name not in known:
        what = "flag" if name.startswith("-") else "command"
        near = difflib.get_close_matches(name.lstrip("-"), list(known), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UsageError(f"unknown {what} {name!r}{hint} (spa-vl --help lists the commands)")
    command = known[name]
    values, extra = command.parse(argv[1:])
    return command, values, extra


def overview(cli: type) -> str:
    """``spa-vl --help``: what spa-vl is, and one line per command."""
    known = commands(cli)
    width = max(map(len, known))
    lines = ["usage: spa-vl COMMAND [ARGS ...]     spa-vl COMMAND --help     spa-vl --version", "",
             inspect.cleandoc(cli.__doc__ or "").splitlines()[0], "", "commands:"]
    for name, command in known.items():
        lines.append(f"  {name:<{width}}  {command.doc.splitlines()[0] if command.doc else ''}")
    return "\n".join(lines) + "\n"


def _base_type(annotation) -> tuple[type | None, bool]:
    """``str | None`` → (str, True); ``int`` → (int, False); anything else → (None, ...) for fire to parse."""
    optional = False
    if isinstance(annotation, UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not NoneType]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else None
    return (annotation if annotation in (str, int, float, bool) else None), optional
