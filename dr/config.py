"""Argparse + YAML config handling in the timm style (``-c/--config`` gives defaults, the CLI overrides)."""
import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .io import atomic_write

_logger = logging.getLogger(__name__)


def create_config_parser() -> argparse.ArgumentParser:
    """The first-stage parser that only looks for ``-c/--config``."""
    parser = argparse.ArgumentParser(description='Config', add_help=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file specifying default arguments (unknown keys are an error)')
    return parser


def load_config_defaults(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config and check each key against the parser's argument names.

    Keys may be written with underscores (``bake_omega``) or dashes (``bake-omega``).

    Raises:
        ValueError: naming the file and every unknown key.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Config file not found: {path}')
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f'Config file {path} must hold a mapping of argument names to values, '
                         f'got {type(cfg).__name__}')
    known = set(parser_dests(parser))
    normalized = {}
    unknown = []
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in known:
            unknown.append(str(key))
        normalized[dest] = value
    if unknown:
        raise ValueError(
            f'Unknown key(s) in config file {path}: {", ".join(sorted(unknown))}. '
            f'Keys must be argument names of this script (see --help).')
    return normalized


def parse_args(
        parser: argparse.ArgumentParser,
        config_parser: Optional[argparse.ArgumentParser] = None,
        argv: Optional[Sequence[str]] = None,
) -> Tuple[argparse.Namespace, str]:
    """Two-stage parse: YAML defaults from ``--config``, then the command line.

    Returns:
        The parsed namespace (with ``config`` set) and the resolved args as YAML text.
    """
    config_parser = config_parser or create_config_parser()
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
    """The argument names (dests) a parser defines."""
    return [a.dest for a in parser._actions if a.dest not in (argparse.SUPPRESS, 'help', 'config')]


def args_to_yaml(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """Resolved args as YAML that ``--config`` accepts again.

    With ``parser``, only its arguments are written (values derived at run time, such as a resolved ``lr``, are
    kept; bookkeeping attributes such as ``rank`` are dropped), so the file loads again without unknown keys.
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


def parse_key_values(items: Optional[List[str]], flag: str) -> Dict[str, Any]:
    """Parse ``key=value`` strings (values read as YAML scalars) for dict-like flags."""
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ValueError(f'{flag}: expected key=value, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = yaml.safe_load(v)
    return out
