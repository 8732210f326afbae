"""Argparse + YAML config handling in the timm style (``-c/--config`` gives defaults, the CLI overrides).

YAML values go through the same checks as the command line: each value is converted with the matching argument's
``type``, checked against its ``choices`` and its ``nargs`` (a list of exactly N values, at least one, ...), and flags
(``store_true``, ``--x/--no-x``) take real YAML booleans only, so ``bake: "no"`` is an error instead of True.
Every problem is reported as ``file: key: problem`` before a script does any work.
"""
import argparse
import difflib
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .io import atomic_write

_logger = logging.getLogger(__name__)

CONFIG_HELP = 'YAML file of default arguments (keys are argument names; the command line overrides them)'


class ConfigError(ValueError):
    """A config file that cannot be used; the message lists every problem as ``file: key: problem``."""


def create_config_parser() -> argparse.ArgumentParser:
    """The first-stage parser that only looks for ``-c/--config``."""
    parser = argparse.ArgumentParser(description='Config', add_help=False)
    add_config_argument(parser)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """List ``-c/--config`` in the main parser's ``--help`` (the first-stage parser consumes it; idempotent)."""
    if '--config' not in parser._option_string_actions:
        parser.add_argument('-c', '--config', default='', type=str, metavar='FILE', help=CONFIG_HELP)


def cli_only(action: argparse.Action) -> argparse.Action:
    """Mark an argument as command-line only: a config file may not set it and ``args.yaml`` does not record it.

    For flags that must never be replayed from a saved config, e.g. ``train.py --overwrite``.
    """
    action.cli_only = True
    return action


class ParseKwargs(argparse.Action):
    """``--x KEY=VALUE ...`` as a dict (timm's ``utils.ParseKwargs``; values read as YAML scalars).

    Without timm at parse time (``--help`` stays instant). A config file gives the mapping itself (timm's
    ``args.yaml`` writes ``model_kwargs: {}``) or a list of ``KEY=VALUE`` strings.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            kwargs = parse_key_values(values, option_string or self.dest)
        except ValueError as e:
            parser.error(str(e))
        setattr(namespace, self.dest, kwargs)


def load_config_defaults(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config and check each key and value against the parser's arguments.

    Keys may be written with underscores (``bake_omega``) or dashes (``bake-omega``). Values are converted and
    checked as the command line would (type, choices, nargs, booleans for flags).

    Returns:
        ``{dest: converted value}``, ready for ``parser.set_defaults``.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: naming the file and, one line each, every bad key with its problem.
    """
    cfg = _read_yaml_mapping(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, 'help', 'config')}
    aliases = {}  # other long option names of an argument (--kd-temp of --kd-temperature): their keys load too
    for a in actions.values():
        for opt in a.option_strings:
            name = opt.lstrip('-').replace('-', '_')
            if opt.startswith('--') and name != a.dest:
                aliases.setdefault(name, a.dest)
    out: Dict[str, Any] = {}
    seen: Dict[str, str] = {}
    problems: List[str] = []
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        dest = dest if dest in actions else aliases.get(dest, dest)
        action = actions.get(dest)
        first = seen.setdefault(dest, str(key))
        if action is None:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f'; did you mean {close[0]}?' if close else ' (keys are argument names of this script, see --help)'
            problems.append(f'{path}: {key}: unknown key{hint}')
        elif first != str(key):
            problems.append(f'{path}: {key}: given twice (also as {first})')
        elif getattr(action, 'cli_only', False):
            problems.append(f'{path}: {key}: {_flag(action)} is a command-line-only flag; a config file cannot set it')
        else:
            try:
                out[dest] = config_value(action, value)
            except ValueError as e:
                problems.append(f'{path}: {key}: {e}')
    if problems:
        raise ConfigError('\n'.join(problems))
    return out


def _read_yaml_mapping(path: str) -> Dict[Any, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: config file not found' if not os.path.isdir(path)
                                else f'{path}: is a folder, not a config file')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f'{path}:{mark.line + 1}:{mark.column + 1}' if mark is not None else path
        problem = getattr(e, 'problem', None) or str(e)
        raise ConfigError(f'{where}: not valid YAML ({problem})') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'{path}: cannot read the config file ({e})') from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f'{path}: must hold a mapping of argument names to values, got a {type(cfg).__name__}')
    return cfg


def config_value(action: argparse.Action, value: Any) -> Any:
    """Convert one YAML value as the command line would convert the argument of ``action``.

    Raises:
        ValueError: what is wrong with the value (the caller prefixes file and key).
    """
    if action.nargs == 0:
        return _flag_value(action, value)
    if isinstance(action, ParseKwargs):
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return parse_key_values(value, _flag(action))
        raise ValueError(f'expected a mapping of keyword arguments (or a list of KEY=VALUE), got {_kind(value)}')
    if _is_default(action, value):  # e.g. `wandb_tags: []` in a saved args.yaml, which the command line cannot give
        return value
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f'expected {_expected(action)}, got null')
    nargs = action.nargs
    if nargs is None or nargs == argparse.OPTIONAL:
        if nargs == argparse.OPTIONAL and isinstance(value, bool) and action.const is not None:
            return action.const if value else action.default  # `--torchcompile` given without a value
        if isinstance(value, (list, dict)):
            raise ValueError(f'expected {_expected(action)}, got {_kind(value)}')
        return _scalar(action, value)
    if nargs in (argparse.REMAINDER, argparse.PARSER):
        return value
    values = value if isinstance(value, list) else [value]
    if isinstance(value, dict):
        raise ValueError(f'expected {_expected(action)}, got a mapping')
    if isinstance(nargs, int) and len(values) != nargs:
        raise ValueError(f'expected {_expected(action)}, got {len(values)} value(s)')
    if nargs == argparse.ONE_OR_MORE and not values:
        raise ValueError(f'expected {_expected(action)}, got an empty list')
    converted = []
    for i, v in enumerate(values):
        if isinstance(v, (list, dict)) or v is None:
            raise ValueError(f'item {i + 1}: expected {_type_name(action)}, got {_kind(v)}')
        try:
            converted.append(_scalar(action, v))
        except ValueError as e:
            raise ValueError(f'item {i + 1}: {e}') from None
    return converted


def _is_default(action: argparse.Action, value: Any) -> bool:
    default = action.default
    if isinstance(default, tuple):
        default = list(default)
    return value is not None and type(value) is type(default) and value == default


def _flag_value(action: argparse.Action, value: Any) -> Any:
    """``store_true``/``store_false``/``--x/--no-x`` take YAML booleans; ``count`` an integer >= 0."""
    if isinstance(action, argparse._CountAction):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ValueError(f'expected a count (an integer >= 0), got {_kind(value)}')
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action.const, bool):
        if isinstance(value, bool):
            return value
        if value is None and action.default is None:  # a --x/--no-x flag whose default None means 'decide for me'
            return None
        auto = ', or null (the default: decided at run time)' if action.default is None else ''
        raise ValueError(f'expected true or false{auto}, got {_kind(value)}')
    if value == action.const or value == action.default:  # store_const
        return value
    raise ValueError(f'expected {action.const!r} (the flag given) or {action.default!r}, got {_kind(value)}')


def _scalar(action: argparse.Action, value: Any) -> Any:
    """Apply the argument's type to one YAML scalar and check its choices."""
    type_fn = action.type or str
    if isinstance(value, bool):  # a YAML true/false/yes/no where a string or number belongs
        raise ValueError(f'expected {_type_name(action)}, got {_kind(value)} (quote it if you mean the text)')
    if type_fn is float and isinstance(value, (int, float)):
        converted: Any = float(value)
    elif type_fn is int and isinstance(value, int):
        converted = value
    else:
        try:
            converted = type_fn(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            detail = f' ({e})' if isinstance(e, argparse.ArgumentTypeError) else ''
            raise ValueError(f'expected {_type_name(action)}, got {_kind(value)}{detail}') from None
    if action.choices is not None and converted not in action.choices:
        choices = ', '.join(repr(c) for c in action.choices)
        raise ValueError(f'{converted!r} is not one of the choices ({choices})')
    return converted


def _expected(action: argparse.Action) -> str:
    nargs = action.nargs
    if isinstance(nargs, int):
        return f'a list of {nargs} value(s) ({_type_name(action)} each)'
    if nargs == argparse.ONE_OR_MORE:
        return f'one or more values ({_type_name(action)} each)'
    if nargs == argparse.ZERO_OR_MORE:
        return f'a list of values ({_type_name(action)} each)'
    return _type_name(action)


def _type_name(action: argparse.Action) -> str:
    type_fn = action.type or str
    names = {int: 'an integer', float: 'a number', str: 'a string'}
    name = names.get(type_fn, f'a value {getattr(type_fn, "__name__", repr(type_fn))} accepts')
    if action.choices is not None:
        name += ' (one of ' + ', '.join(repr(c) for c in action.choices) + ')'
    return name


def _kind(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return f'the boolean {str(value).lower()}'
    if isinstance(value, str):
        return f'the string {value!r}'
    if isinstance(value, (int, float)):
        return f'the number {value!r}'
    if isinstance(value, list):
        return f'a list {value!r}' if len(repr(value)) < 60 else f'a list of {len(value)} items'
    if isinstance(value, dict):
        return 'a mapping'
    return f'{type(value).__name__} {value!r}'


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def parse_args(
        parser: argparse.ArgumentParser,
        config_parser: Optional[argparse.ArgumentParser] = None,
        argv: Optional[Sequence[str]] = None,
) -> Tuple[argparse.Namespace, str]:
    """Two-stage parse: YAML defaults from ``--config``, then the command line.

    ``-c/--config`` is added to ``parser`` so its ``--help`` lists it. A bad config file (unknown key, a value the
    command line would refuse, malformed YAML) exits with status 2 and ``file: key: problem`` lines.

    Returns:
        The parsed namespace (with ``config`` set) and the resolved args as YAML text.
    """
    config_parser = config_parser or create_config_parser()
    add_config_argument(parser)
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        try:
            cfg = load_config_defaults(args_config.config, parser)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    return args, args_to_yaml(args, parser)


def parser_dests(parser: argparse.ArgumentParser) -> List[str]:
    """The argument names (dests) a parser defines (command-line-only flags excluded)."""
    return [a.dest for a in parser._actions
            if a.dest not in (argparse.SUPPRESS, 'help', 'config') and not getattr(a, 'cli_only', False)]


def args_to_yaml(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """Resolved args as YAML that ``--config`` accepts again.

    With ``parser``, only its arguments are written (values derived at run time, such as a resolved ``lr``, are
    kept; bookkeeping attributes such as ``rank`` and command-line-only flags are dropped), so the file loads again.
    """
    keep = set(parser_dests(parser)) if parser is not None else None
    d = {k: _plain(v) for k, v in vars(args).items()
         if k != 'config' and not k.startswith('_') and (keep is None or k in keep)}
    return yaml.safe_dump(d, default_flow_style=False, sort_keys=True)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_args_yaml(args_text: str, output_dir: str, filename: str = 'args.yaml') -> str:
    """Write the resolved args next to the outputs (atomically)."""
    path = os.path.join(output_dir, filename)
    with atomic_write(path, 'w') as f:
        f.write(args_text)
    return path


def resolve_dataset_name(dataset: Optional[str], root: Optional[str], root_flag: str = 'DIR') -> str:
    """The dataset a script reads, as timm reads it: ``root`` is an ImageFolder/tar (or the root of the timm dataset
    ``dataset`` names); the embedded ``digits`` only when no dataset root is given.

    Raises:
        ValueError: ``--dataset digits`` together with a root (the digits read no folder), naming both.
    """
    if dataset and dataset.lower() == 'digits' and root:
        raise ValueError(f'--dataset {dataset} and {root_flag} {root} are both given: the digits are embedded and '
                         f'read no folder; drop --dataset {dataset} to read {root}, or drop {root_flag}')
    if not dataset and not root:
        return 'digits'
    return dataset or ''


def parse_key_values(items: Optional[List[str]], flag: str) -> Dict[str, Any]:
    """Parse ``key=value`` strings (values read as YAML scalars) for dict-like flags."""
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ValueError(f'{flag}: expected key=value, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = yaml.safe_load(v)
    return out
