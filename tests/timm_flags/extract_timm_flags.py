#!/usr/bin/env python3
"""Extract the command-line flags of timm's train.py and validate.py into JSON (for tests/test_timm_parity.py).

Reads the scripts' source with ``ast`` (nothing is imported or run) and records, for every ``add_argument`` call:
the option strings, dest, type, default, action, nargs, const and choices as written in timm's source.

    python tests/timm_flags/extract_timm_flags.py --version 1.0.31 \\
        --train PATH/TO/pytorch-image-models/train.py --validate PATH/TO/pytorch-image-models/validate.py \\
        --source 'huggingface/pytorch-image-models v1.0.31' > tests/timm_flags/timm_flags.json

Run it on a checkout of the timm tag the project installs (``python -c "import timm; print(timm.__version__)"``)
whenever pyproject.toml moves to a new timm version; the parity test then names every flag that is missing here or
whose default or type changed.
"""
import argparse
import ast
import json
import sys
from typing import Any, Dict, List, Optional


def _literal(node: ast.AST) -> Any:
    """A literal value (numbers, strings, lists, dicts, None, simple arithmetic such as ``3. / 4.``)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Div, ast.Mult, ast.Add, ast.Sub)):
        a, b = _literal(node.left), _literal(node.right)
        return {ast.Div: a / b, ast.Mult: a * b, ast.Add: a + b, ast.Sub: a - b}[type(node.op)]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    raise ValueError(f'not a literal: {ast.unparse(node)}')


def _name(node: Optional[ast.AST]) -> Optional[str]:
    """``int``, ``utils.ParseKwargs`` -> the last name (``ParseKwargs``); a string action as is."""
    if node is None:
        return None
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ast.unparse(node)


def _dest(options: List[str], keywords: Dict[str, ast.AST]) -> str:
    if 'dest' in keywords:
        return _literal(keywords['dest'])
    longs = [o for o in options if o.startswith('--')]
    name = (longs or options)[0].lstrip('-')
    return name.replace('-', '_')


def extract_flags(source: str) -> List[Dict[str, Any]]:
    """Every ``*.add_argument(...)`` call of a script, in source order."""
    flags = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == 'add_argument'):
            continue
        options = [_literal(a) for a in node.args]
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        action = _name(keywords.get('action')) or 'store'
        flag_default = False if action == 'store_true' else True if action == 'store_false' else None
        default = _literal(keywords['default']) if 'default' in keywords else flag_default
        flags.append((node.lineno, {
            'options': options,
            'dest': _dest(options, keywords),
            'positional': not options[0].startswith('-'),
            'type': _name(keywords.get('type')) or ('str' if action == 'store' else None),
            'default': default,
            'action': action,
            'nargs': _literal(keywords['nargs']) if 'nargs' in keywords else None,
            'const': _literal(keywords['const']) if 'const' in keywords else None,
            'choices': _literal(keywords['choices']) if 'choices' in keywords else None,
        }))
    return [f for _, f in sorted(flags, key=lambda lf: lf[0])]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--train', required=True, help="path to timm's train.py")
    parser.add_argument('--validate', required=True, help="path to timm's validate.py")
    parser.add_argument('--version', required=True, help='the timm version the scripts belong to')
    parser.add_argument('--source', default='', help='where the scripts came from (repository, tag or commit)')
    args = parser.parse_args(argv)
    out = {'timm_version': args.version, 'source': args.source,
           'command': 'python tests/timm_flags/extract_timm_flags.py ' + ' '.join(argv or sys.argv[1:])}
    for script, path in (('train.py', args.train), ('validate.py', args.validate)):
        with open(path) as f:
            out[script] = extract_flags(f.read())
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write('\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
