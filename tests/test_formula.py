import math

import pytest
import torch

from nnfit.errors import NnfitError
from nnfit.formula import parse_formula


def X(*cols):
    return torch.tensor(list(zip(*cols)), dtype=torch.float64)


@pytest.mark.parametrize("text, variables, cols, expected", [
    ("x**2 + x", ["x"], [[0.5, 2.0]], [0.75, 6.0]),
    ("y = x**2 + x", ["x"], [[3.0]], [12.0]),
    ("a*sin(b) + c", ["a", "b", "c"], [[2.0], [math.pi / 2], [1.0]], [3.0]),
    ("-x + (x - 1) / 2", ["x"], [[4.0]], [-2.5]),
    ("exp(log(x)) + log10(100) + sqrt(x) + abs(-x)", ["x"], [[4.0]], [4 + 2 + 2 + 4]),
    ("arcsin(x) + arccos(x) + arctan(x) - arctan(x)", ["x"], [[0.3]], [math.pi / 2]),
    ("sinh(x) + cosh(x) - exp(x) + tanh(x) + tan(x) + cos(x)", ["x"], [[0.2]],
     [math.tanh(0.2) + math.tan(0.2) + math.cos(0.2)]),
    ("pi * e + 2**-1", ["x"], [[1.0, 2.0]], [math.pi * math.e + 0.5] * 2),
    ("sqrt(2) * x", ["x"], [[1.0]], [math.sqrt(2)]),
])
def test_valid_formulas_give_correct_values(text, variables, cols, expected):
    f = parse_formula(text, variables)
    out = f(X(*cols))
    assert out.shape == (len(expected),)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64))


def test_formula_keeps_device_and_dtype():
    f = parse_formula("x**2 + 1", ["x"])
    x = torch.rand(5, 1, dtype=torch.float32)
    assert f(x).dtype == torch.float32


@pytest.mark.parametrize("text, phrase", [
    ("__import__('os').system('x')", "not allowed"),
    ("().__class__", "attribute access"),
    ("x.real", "attribute access ('x.real')"),
    ("open('f')", "unknown function 'open'"),
    ("lambda: 1", "a lambda"),
    ("[x for x in y]", "comprehension"),
    ("'a'*9**9**9", "str constant 'a'"),
    ("foo(x)", "unknown function 'foo'"),
    ("x + z", "variable 'z' has no domain"),
    ("__builtins__", "dunder name '__builtins__'"),
    ("sin(x=1)", "keyword argument"),
    ("sin(x, x)", "exactly one argument"),
    ("x[0]", "indexing"),
    ("x if x else 1", "a conditional"),
    ("x > 1", "a comparison"),
    ("9**9**9", "exponent"),
    ("x**(10**4)", "exponent"),
    ("x +", "not valid syntax"),
    ("", "empty"),
    ("x" + "+x" * 400, "syntax nodes"),
    ("(" * 300 + "x" + ")" * 300, "formula"),
    ("sin", "is a function"),
    ("(x := 1)", "an assignment"),
    ("b'x'", "bytes constant"),
    ("1j * x", "complex constant"),
])
def test_hostile_or_bad_formulas_are_rejected_with_a_message(text, phrase):
    with pytest.raises(NnfitError) as info:
        parse_formula(text, ["x"])
    assert phrase in str(info.value)


def test_formula_never_calls_eval(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    f = parse_formula("x**2 + sin(x)", ["x"])
    assert torch.isfinite(f(torch.rand(3, 1))).all()
