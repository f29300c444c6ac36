"""Nothing let in: no unsafe loading or eval in the package, and a parser that never runs anything."""

import ast
import builtins
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnfit.errors import NnfitError
from nnfit.formula import parse_formula

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nnfit"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if not isinstance(f, (ast.Name, ast.Attribute)):
                continue
            name = f.id if isinstance(f, ast.Name) else f.attr
            owner = "" if isinstance(f, ast.Name) else f.value.id if isinstance(f.value, ast.Name) else "?"
            yield node, owner, name


def test_package_never_unpickles_evals_or_execs():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    problems = []
    for path in sources:
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle module")
        for node, owner, name in _calls(tree):
            where = f"{path.name}:{node.lineno}"
            if owner in ("", "builtins") and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where} calls {name}")
            if owner == "torch" and name == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    problems.append(f"{where} calls torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy"):
                if any(k.arg == "allow_pickle" and getattr(k.value, "value", False) is not False
                       for k in node.keywords) or not any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{where} calls numpy.load without allow_pickle=False")
        if re.search(r"\bpickle\.loads?\(", text):
            problems.append(f"{path.name} calls pickle.load")
    # The one pickle a user may make is of the sklearn estimator (sklearn requires it); nnfit's
    # own files never use it, which is what this test checks.
    assert problems == []


_names = st.sampled_from(["x", "y", "sin", "exp", "__import__", "os", "open", "pi", "e", "__class__", "abs"])
_leaf = st.one_of(
    st.builds(ast.Name, id=_names, ctx=st.just(ast.Load())),
    st.builds(ast.Constant, value=st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                                            st.text(max_size=3), st.booleans(), st.none())),
)


def _extend(children):
    load = st.just(ast.Load())
    return st.one_of(
        st.builds(ast.BinOp, left=children, right=children,
                  op=st.sampled_from([ast.Add(), ast.Sub(), ast.Mult(), ast.Div(), ast.Pow(), ast.Mod(),
                                      ast.FloorDiv(), ast.BitXor()])),
        st.builds(ast.UnaryOp, operand=children, op=st.sampled_from([ast.USub(), ast.UAdd(), ast.Not(),
                                                                     ast.Invert()])),
        st.builds(ast.Call, func=children, args=st.lists(children, max_size=2), keywords=st.just([])),
        st.builds(ast.Attribute, value=children, attr=st.sampled_from(["real", "__class__", "system"]), ctx=load),
        st.builds(ast.Subscript, value=children, slice=children, ctx=load),
        st.builds(ast.Lambda, args=st.just(ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[],
                                                         defaults=[])), body=children),
        st.builds(ast.List, elts=st.lists(children, max_size=2), ctx=load),
    )


_trees = st.recursive(_leaf, _extend, max_leaves=12)


def _no_side_effects(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the parser ran code")

    real_compile = builtins.compile

    def ast_only(source, filename, mode, flags=0, *a, **k):
        if not flags & ast.PyCF_ONLY_AST:  # ast.parse compiles to a tree only, never to code
            raise AssertionError("the parser compiled code")
        return real_compile(source, filename, mode, flags, *a, **k)

    for name in ("eval", "exec", "open"):
        monkeypatch.setattr(builtins, name, boom)
    monkeypatch.setattr(builtins, "compile", ast_only)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_random_asts_give_a_function_or_nnfit_error(tree, monkeypatch):
    expr = ast.fix_missing_locations(ast.Expression(body=tree))
    try:
        text = ast.unparse(expr)
    except Exception:
        return  # hypothesis built a tree Python itself cannot print; not a formula anyone can type
    with monkeypatch.context() as m:
        _no_side_effects(m)
        try:
            f = parse_formula(text, ["x", "y"])
        except NnfitError:
            return
    out = f(torch.rand(4, 2, dtype=torch.float64))
    assert out.shape == (4,)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=80) | st.text(max_size=80))
def test_random_bytes_and_text_give_a_function_or_nnfit_error(raw, monkeypatch):
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    with monkeypatch.context() as m:
        _no_side_effects(m)
        try:
            parse_formula(text, ["x"])
        except NnfitError:
            pass


def test_non_string_formula():
    with pytest.raises(NnfitError, match="must be a string"):
        parse_formula(b"x", ["x"])
