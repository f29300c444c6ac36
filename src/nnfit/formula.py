"""A safe formula language: Python's ast, an allow-list, and torch to evaluate.

A formula such as ``a*sin(b) + c`` is parsed once into a small expression tree
of allowed nodes. Nothing is ever passed to ``eval`` or ``exec``; evaluation
walks the tree with torch functions, so a formula runs on any device.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from nnfit.errors import NnfitError
from nnfit.errors import setting as S

# Names of the functions a formula may call, mapped to the torch function name.
FUNCTIONS = {
    "sin": "sin", "cos": "cos", "tan": "tan",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh",
    "exp": "exp", "log": "log", "log10": "log10", "sqrt": "sqrt", "abs": "abs",
}
CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_LENGTH = 2000  # characters; longer text is almost surely not a formula
MAX_NODES = 500  # bounds both evaluation cost and the parser's recursion
MAX_EXPONENT = 1000  # a larger constant exponent only overflows, or takes forever

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_ALLOWED = (
    "numbers, the variables given a domain ({vars}), + - * / **, unary minus, "
    "parentheses, the functions " + ", ".join(FUNCTIONS) + " and the constants pi and e"
)


@dataclass(frozen=True)
class Formula:
    """A parsed formula. Call it with a tensor of shape (n, len(variables))."""

    text: str
    variables: tuple[str, ...]
    _fn: Callable = None  # type: ignore[assignment]

    def __call__(self, X):
        """Evaluate on ``X`` (a 2-D tensor, columns in ``variables`` order); returns shape (n,)."""
        import torch

        if X.ndim != 2 or X.shape[1] != len(self.variables):
            raise NnfitError(
                f"formula {self.text!r} takes {len(self.variables)} column(s) "
                f"({', '.join(self.variables)}), but got an array of shape {tuple(X.shape)}"
            )
        columns = {name: X[:, i] for i, name in enumerate(self.variables)}
        out = self._fn(columns, torch)
        if not isinstance(out, torch.Tensor) or out.ndim == 0:  # a constant formula
            out = torch.full((X.shape[0],), float(out), dtype=X.dtype, device=X.device)
        return out


def parse_formula(text: str, variables: Sequence[str]) -> Formula:
    """Parse ``text`` against the allow-list; ``variables`` are the names with a domain."""
    if not isinstance(text, str):
        raise NnfitError(f"a formula must be a string, got {type(text).__name__}")
    source = text.strip()
    lhs = re.match(r"\s*[A-Za-z_]\w*\s*=(?!=)", source)
    if lhs:  # accept "y = x**2 + x"
        source = source[lhs.end():].strip()
    if not source:
        raise NnfitError("the formula is empty; write an expression such as 'x**2 + x'")
    if len(source) > MAX_LENGTH:
        raise NnfitError(f"the formula is {len(source)} characters long; at most {MAX_LENGTH} are allowed")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise NnfitError(f"formula {text!r} is not valid syntax{where}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise NnfitError(f"formula {text!r} could not be parsed ({type(exc).__name__}); simplify it") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_NODES:
        raise NnfitError(f"formula {text!r} has {nodes} syntax nodes; at most {MAX_NODES} are allowed")
    variables = tuple(variables)
    fn = _compile(tree.body, set(variables), text)
    return Formula(text=source, variables=variables, _fn=fn)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


def _reject(text: str, piece: str, variables: set[str]) -> NnfitError:
    allowed = _ALLOWED.format(vars=", ".join(sorted(variables)) or "none")
    return NnfitError(f"formula {text!r}: {piece} is not allowed; a formula may use {allowed}")


def _segment(node: ast.AST, text: str) -> str:
    try:
        return repr(ast.unparse(node))
    except Exception:  # unparse fails only on malformed trees, never on parsed text
        return type(node).__name__


def _constant_value(node: ast.AST):
    """The value of a constant sub-expression made only of numbers, or None."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _constant_value(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exp = _constant_value(node.left), _constant_value(node.right)
        if base is None or exp is None or abs(exp) > MAX_EXPONENT:
            return None if exp is None or abs(exp) <= MAX_EXPONENT else math.inf
        try:
            return float(base) ** float(exp)
        except (OverflowError, ZeroDivisionError, ValueError):
            return math.inf
    return None


def _compile(node: ast.AST, variables: set[str], text: str) -> Callable:
    """Turn an allowed node into a function of (columns, torch)."""
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise _reject(text, f"the {type(node.value).__name__} constant {node.value!r}", variables)
        try:
            value = float(node.value)
        except OverflowError:  # an integer of more than 308 digits
            digits = str(node.value) if len(str(node.value)) <= 20 else f"{str(node.value)[:12]}... " \
                f"({len(str(node.value))} digits)"
            raise NnfitError(f"formula {_short(text)}: the number {digits} is too large for a floating-point "
                             "number (the largest is about 1.8e308); write it smaller, e.g. as 1e300") from None
        return lambda cols, torch: value
    if isinstance(node, ast.Name):
        name = node.id
        if name.startswith("__"):
            raise _reject(text, f"the dunder name {name!r}", variables)
        if name in variables:
            return lambda cols, torch: cols[name]
        if name in CONSTANTS:
            value = CONSTANTS[name]
            return lambda cols, torch: value
        if name in FUNCTIONS:
            raise NnfitError(f"formula {text!r}: {name} is a function; call it, e.g. {name}(x)")
        raise NnfitError(
            f"formula {text!r}: variable {name!r} has no domain (variables with a domain: "
            f"{', '.join(sorted(variables)) or 'none'}; constants: pi, e); "
            f"give it one with {S('domain', f'{name}=LOW:HIGH', f'{{{name!r}: (LOW, HIGH)}}')}"
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _compile(node.operand, variables, text)
        if isinstance(node.op, ast.UAdd):
            return inner
        return lambda cols, torch: -inner(cols, torch)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):  # x^2: a power in most other notations
        raise NnfitError(f"formula {text!r}: '^' is XOR in Python, not a power; write powers with '**': "
                         f"{text.replace('^', '**')!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        if isinstance(node.op, ast.Pow):
            exponent = _constant_value(node.right)
            if exponent is not None and abs(exponent) > MAX_EXPONENT:
                raise NnfitError(
                    f"formula {text!r}: the exponent in {_segment(node, text)} is larger than "
                    f"{MAX_EXPONENT}; such a power only overflows, so it is refused"
                )
        left = _compile(node.left, variables, text)
        right = _compile(node.right, variables, text)
        return _binary(type(node.op), left, right)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise _reject(text, f"the call {_segment(node, text)}", variables)
        name = node.func.id
        if name not in FUNCTIONS:
            raise NnfitError(
                f"formula {text!r}: unknown function {name!r}; "
                f"allowed functions are {', '.join(FUNCTIONS)}"
            )
        if node.keywords:
            raise _reject(text, f"the keyword argument in {_segment(node, text)}", variables)
        if len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise NnfitError(f"formula {text!r}: {name} takes exactly one argument, got {_segment(node, text)}")
        arg = _compile(node.args[0], variables, text)
        torch_name = FUNCTIONS[name]

        def call(cols, torch):
            value = arg(cols, torch)
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=torch.float64)
            return getattr(torch, torch_name)(value)

        return call
    described = {
        ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Lambda: "a lambda",
        ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension",
        ast.Compare: "a comparison", ast.BoolOp: "a boolean operator", ast.IfExp: "a conditional",
        ast.NamedExpr: "an assignment", ast.JoinedStr: "a string", ast.List: "a list",
        ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set",
    }.get(type(node), f"the operator or expression {type(node).__name__}")
    return _raise(_reject(text, f"{described} ({_segment(node, text)})", variables))


def _raise(error: Exception):
    raise error


def _binary(op: type, left: Callable, right: Callable) -> Callable:
    if op is ast.Add:
        return lambda cols, torch: left(cols, torch) + right(cols, torch)
    if op is ast.Sub:
        return lambda cols, torch: left(cols, torch) - right(cols, torch)
    if op is ast.Mult:
        return lambda cols, torch: left(cols, torch) * right(cols, torch)
    if op is ast.Div:
        return lambda cols, torch: _div(left(cols, torch), right(cols, torch), torch)
    return lambda cols, torch: _pow(left(cols, torch), right(cols, torch), torch)


def _div(a, b, torch):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return a / b if b != 0 else math.copysign(math.inf, a) if a else math.nan
    return torch.as_tensor(a) / b if not isinstance(a, torch.Tensor) else a / b


def _pow(a, b, torch):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        try:
            return math.pow(a, b)
        except OverflowError:
            return math.inf
        except ValueError:  # a negative number to a fractional power, or 0 to a negative one
            return math.nan
    if not isinstance(a, torch.Tensor):
        return torch.pow(a, b)
    return a ** b
