"""VNN-LIB 1.0 properties, as VNN-COMP ships them, into input boxes and output `Property` objects.

A file declares inputs `X_0 .. X_{n-1}` and outputs `Y_0 .. Y_{m-1}` and asserts constraints whose
conjunction describes the VIOLATION: the instance is `sat` when some input in the box produces
outputs meeting the output constraints. Assertions may nest `and`/`or`; the whole formula is put
in disjunctive normal form, and disjuncts that share an input box are grouped into one
`SpecCase` (one sub-problem: its box and a `Property` whose terms are the output conjunctions).
The instance is sat if any case is sat, unsat only if every case is.

Supported: `declare-const` of `Real` variables named `X_i`/`Y_i`; `assert`; `and`, `or`; the
comparisons `<=`, `>=`, `=`, and `<`, `>` (read as non-strict: a safe over-approximation of the
violation set for `unsat`, and every counterexample is re-checked before `sat` is written);
linear arithmetic with `+`, `-`, `*` by constants and `/` by constants. Input constraints must
bound single inputs (a box); a constraint mixing inputs and outputs is rejected. Errors name the
line.

Numbers are read exactly (as fractions) and each input bound is rounded outward to float64:
lower bounds down, upper bounds up, whenever the decimal (or the quotient of a scaled bound) has
no exact float64 value. So the stored box always contains the box the file describes, and
`SpecCase.rounded_out` gives the same guarantee for float32 arrays (what the backends compute
with).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lipverify.errors import InputError
from lipverify.types import Property

# A formula whose disjunctive normal form has more disjuncts than this is refused (not guessed).
MAX_DISJUNCTS = 100_000
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_NUMERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_VARIABLE = re.compile(r"^([XY])_(\d+)$")
_IGNORED = frozenset({"set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"})
_COMPARISONS = frozenset({"<=", ">=", "<", ">", "="})


class VnnlibError(InputError):
    """A VNN-LIB file that is malformed or uses what lipverify does not support."""

    def __init__(self, message: str, line: int | None = None, source: str = "<vnnlib>") -> None:
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


class Token(NamedTuple):
    """One token and the line it starts on (1-based)."""

    text: str
    line: int


@dataclass(frozen=True)
class SExpr:
    """A parenthesised list and the line of its opening parenthesis."""

    items: tuple[SExpr | Token, ...]
    line: int


@dataclass(frozen=True)
class SpecCase:
    """One input box with the output conjunctions (a disjunction) that violate it."""

    lower: np.ndarray
    upper: np.ndarray
    prop: Property

    @property
    def centre(self) -> np.ndarray:
        """Centre of the box."""
        return (self.lower + self.upper) / 2

    def rounded_out(self, dtype: type[np.floating] = np.float32) -> SpecCase:
        """The same case on the smallest box of `dtype` values that contains this box.

        Its bounds (float64 arrays holding `dtype` values) survive any later conversion to
        `dtype` or float64 unchanged, so a backend computing in float32 still bounds a region
        containing the whole box; and a box float32 cannot represent (lower == upper == 0.1)
        gets the float32 neighbours on either side.
        """
        lower, upper = round_outward(self.lower, self.upper, dtype)
        return SpecCase(lower, upper, self.prop)


@dataclass(frozen=True)
class VnnlibSpec:
    """A parsed VNN-LIB property: sizes and the sub-problems (empty when no input qualifies)."""

    num_inputs: int
    num_outputs: int
    cases: tuple[SpecCase, ...]
    source: str = "<vnnlib>"


@dataclass(frozen=True)
class _Linear:
    """`sum coef[v] * v + const`, with `v` a ("X" or "Y", index) pair, in exact fractions."""

    coef: dict[tuple[str, int], Fraction]
    const: Fraction


@dataclass(frozen=True)
class _Atom:
    """`expr <= 0` from the given line."""

    expr: _Linear
    line: int


def round_outward(lower: np.ndarray, upper: np.ndarray,
                  dtype: type[np.floating] = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The smallest box of `dtype` values containing `[lower, upper]`, as float64 arrays."""
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    with np.errstate(over="ignore"):  # a bound beyond dtype's range becomes infinite
        lo, hi = lower.astype(dtype), upper.astype(dtype)
    # ^ round to nearest, then one step outward wherever that landed inside the box
    lo = np.where(lo.astype(np.float64) > lower, np.nextafter(lo, dtype(-np.inf)), lo)
    hi = np.where(hi.astype(np.float64) < upper, np.nextafter(hi, dtype(np.inf)), hi)
    return lo.astype(np.float64), hi.astype(np.float64)


def _to_float(value: Fraction, direction: int) -> float:
    """`value` as a float: the nearest (0), the largest not above (-1), the smallest not below (1)."""
    try:
        out = float(value)  # correctly rounded
    except OverflowError:
        return math.inf if value > 0 else -math.inf
    if direction < 0 and Fraction(out) > value:
        out = math.nextafter(out, -math.inf)
    elif direction > 0 and Fraction(out) < value:
        out = math.nextafter(out, math.inf)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _numeral(text: str) -> Fraction:
    """The exact value of a numeral (files repeat the same few hundred values)."""
    return Fraction(text)


def tokenize(text: str) -> list[Token]:
    """Tokens of `text`, comments (`;` to end of line) removed."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens.extend(Token(t, number) for t in _TOKEN.findall(line.split(";", 1)[0]))
    return tokens


def parse_sexprs(tokens: Sequence[Token], source: str = "<vnnlib>") -> list[SExpr]:
    """The top-level parenthesised lists of a token stream."""
    stack: list[tuple[list[SExpr | Token], int]] = []
    top: list[SExpr] = []
    for tok in tokens:
        if tok.text == "(":
            stack.append(([], tok.line))
        elif tok.text == ")":
            if not stack:
                raise VnnlibError("unbalanced ')'", tok.line, source)
            items, line = stack.pop()
            expr = SExpr(tuple(items), line)
            (stack[-1][0] if stack else top).append(expr)
        elif not stack:
            raise VnnlibError(f"unexpected {tok.text!r} outside parentheses", tok.line, source)
        else:
            stack[-1][0].append(tok)
    if stack:
        raise VnnlibError("'(' is never closed", stack[-1][1], source)
    return top


class _Translator:
    """Turns the parsed commands into linear atoms in disjunctive normal form."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.declared: dict[str, tuple[str, int]] = {}

    def error(self, message: str, line: int) -> VnnlibError:
        return VnnlibError(message, line, self.source)

    def head(self, expr: SExpr) -> str:
        if not expr.items or not isinstance(expr.items[0], Token):
            raise self.error("expected an operator after '('", expr.line)
        return expr.items[0].text

    def declare(self, expr: SExpr) -> None:
        items = expr.items
        if len(items) != 3 or not all(isinstance(i, Token) for i in items[1:]):
            raise self.error("declare-const takes a name and a sort", expr.line)
        name, sort = items[1].text, items[2].text
        if sort != "Real":
            raise self.error(f"{name} has sort {sort}; only Real is supported", expr.line)
        match = _VARIABLE.match(name)
        if match is None:
            raise self.error(f"variable {name!r} is not named X_i (input) or Y_i (output)",
                             expr.line)
        if name in self.declared:
            raise self.error(f"{name} declared twice", expr.line)
        self.declared[name] = (match.group(1), int(match.group(2)))

    def linear(self, node: SExpr | Token, line: int) -> _Linear:
        if isinstance(node, Token):
            if _NUMERAL.match(node.text):
                return _Linear({}, _numeral(node.text))
            if node.text not in self.declared:
                raise self.error(f"undeclared variable {node.text!r}", node.line)
            return _Linear({self.declared[node.text]: Fraction(1)}, Fraction(0))
        op, args = self.head(node), [self.linear(a, node.line) for a in node.items[1:]]
        if not args:
            raise self.error(f"{op!r} needs arguments", node.line)
        if op == "+":
            return _sum(args, [1] * len(args))
        if op == "-":
            signs = [-1] if len(args) == 1 else [1] + [-1] * (len(args) - 1)
            return _sum(args, signs)
        if op == "*":
            variable = [a for a in args if a.coef]
            if len(variable) > 1:
                raise self.error("product of two variables is not linear", node.line)
            factor = math.prod((a.const for a in args if not a.coef), start=Fraction(1))
            base = variable[0] if variable else _Linear({}, Fraction(1))
            return _sum([base], [factor])
        if op == "/":
            if len(args) != 2 or args[1].coef or args[1].const == 0:
                raise self.error("'/' must divide by a non-zero constant", node.line)
            return _sum([args[0]], [1 / args[1].const])
        raise self.error(f"unsupported arithmetic operator {op!r}", node.line)

    def formula(self, node: SExpr | Token) -> list[list[_Atom]]:
        """Disjunctive normal form: a list of conjunctions of atoms."""
        if isinstance(node, Token):
            raise self.error(f"expected a constraint, got {node.text!r}", node.line)
        op = self.head(node)
        args = node.items[1:]
        if op == "and":
            return _product([self.formula(a) for a in args], node.line, self.source)
        if op == "or":
            return [conj for a in args for conj in self.formula(a)]
        if op in _COMPARISONS:
            if len(args) != 2:
                raise self.error(f"{op!r} takes two arguments, got {len(args)}", node.line)
            lhs, rhs = (self.linear(a, node.line) for a in args)
            le = [_Atom(_sum([lhs, rhs], [1, -1]), node.line)] if op not in (">=", ">") else []
            ge = [_Atom(_sum([rhs, lhs], [1, -1]), node.line)] if op not in ("<=", "<") else []
            return [le + ge]
        raise self.error(f"unsupported connective or comparison {op!r}", node.line)


def _sum(parts: Iterable[_Linear], weights: Iterable[int | Fraction]) -> _Linear:
    coef: dict[tuple[str, int], Fraction] = {}
    const = Fraction(0)
    for part, w in zip(parts, weights, strict=True):
        # ^ fraction arithmetic is slow: skip the products by 1 and the sums of 0 (most of them)
        for key, value in part.coef.items():
            coef[key] = coef.get(key, 0) + (value if w == 1 else w * value)
        if part.const:
            const += part.const if w == 1 else w * part.const
    return _Linear({k: v for k, v in coef.items() if v != 0}, const)


def _product(dnfs: Sequence[list[list[_Atom]]], line: int, source: str) -> list[list[_Atom]]:
    size = math.prod(len(d) for d in dnfs)
    if size > MAX_DISJUNCTS:
        raise VnnlibError(f"formula expands to {size} disjuncts (limit {MAX_DISJUNCTS})", line,
                          source)
    return [[atom for conj in combo for atom in conj] for combo in itertools.product(*dnfs)]


def _sizes(declared: dict[str, tuple[str, int]], source: str) -> tuple[int, int]:
    sizes = []
    for kind in ("X", "Y"):
        indices = sorted(i for k, i in declared.values() if k == kind)
        if not indices:
            raise VnnlibError(f"no {kind}_i variable declared", None, source)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise VnnlibError(f"{kind}_{missing[0]} is not declared but {kind}_{indices[-1]} is",
                              None, source)
        sizes.append(len(indices))
    return sizes[0], sizes[1]


class _Builder:
    """Applies conjunctions of atoms to an input box and output rows."""

    def __init__(self, num_inputs: int, num_outputs: int, source: str) -> None:
        self.n, self.m, self.source = num_inputs, num_outputs, source

    def apply(self, atoms: Iterable[_Atom], lower: np.ndarray, upper: np.ndarray,
              rows: list[tuple[np.ndarray, float]]) -> bool:
        """Tighten the box and add output rows; False when the conjunction is unsatisfiable."""
        for atom in atoms:
            kinds = {kind for kind, _ in atom.expr.coef}
            if not kinds:
                if atom.expr.const > 0:
                    return False
            elif kinds == {"X"}:
                if len(atom.expr.coef) > 1:
                    raise VnnlibError("input constraint on several inputs is not a box",
                                      atom.line, self.source)
                ((_, i), a), = atom.expr.coef.items()
                bound = -atom.expr.const / a  # exact: rounded outward only once, here
                if a > 0:
                    upper[i] = min(upper[i], _to_float(bound, 1))
                else:
                    lower[i] = max(lower[i], _to_float(bound, -1))
            elif kinds == {"Y"}:
                row = np.zeros(self.m)
                for (_, j), value in atom.expr.coef.items():
                    row[j] = _to_float(value, 0)
                rows.append((row, _to_float(-atom.expr.const, 0)))
            else:
                raise VnnlibError("constraint mixes inputs and outputs", atom.line, self.source)
        return True

    def case_key(self, lower: np.ndarray, upper: np.ndarray) -> bytes:
        for i in range(self.n):
            if not math.isfinite(lower[i]) or not math.isfinite(upper[i]):
                side = "lower" if not math.isfinite(lower[i]) else "upper"
                raise VnnlibError(f"input X_{i} has no {side} bound", None, self.source)
        return lower.tobytes() + upper.tobytes()

    def term(self, rows: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:  # no output condition: every output violates (0 <= 0)
            return np.zeros((1, self.m)), np.zeros(1)
        return np.stack([r for r, _ in rows]), np.array([d for _, d in rows])


def parse_vnnlib_text(text: str, source: str = "<vnnlib>") -> VnnlibSpec:
    """Parse VNN-LIB text into its input boxes and output properties."""
    translator = _Translator(source)
    common: list[_Atom] = []
    disjunctive: list[list[list[_Atom]]] = []
    first_or = 0
    for expr in parse_sexprs(tokenize(text), source):
        op = translator.head(expr)
        if op == "declare-const":
            translator.declare(expr)
        elif op == "assert":
            if len(expr.items) != 2:
                raise translator.error("assert takes one constraint", expr.line)
            dnf = translator.formula(expr.items[1])
            if len(dnf) == 1:
                common.extend(dnf[0])
            else:
                first_or = first_or or expr.line
                disjunctive.append(dnf)
        elif op not in _IGNORED:
            raise translator.error(f"unsupported command {op!r}", expr.line)
    n, m = _sizes(translator.declared, source)
    builder = _Builder(n, m, source)
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    rows: list[tuple[np.ndarray, float]] = []
    if not builder.apply(common, lower, upper, rows):
        return VnnlibSpec(n, m, (), source)
    grouped: dict[bytes, tuple[np.ndarray, np.ndarray, list]] = {}
    for conj in _product(disjunctive, first_or, source) if disjunctive else [[]]:
        lo, up, extra = lower.copy(), upper.copy(), list(rows)
        if not builder.apply(conj, lo, up, extra):
            continue
        key = builder.case_key(lo, up)
        if np.any(lo > up):
            continue  # an empty box: no input to violate anything
        grouped.setdefault(key, (lo, up, []))[2].append(builder.term(extra))
    cases = tuple(SpecCase(lo, up, Property.linear(terms, m)) for lo, up, terms in grouped.values())
    return VnnlibSpec(n, m, cases, source)


def read_vnnlib(path: str | Path) -> VnnlibSpec:
    """Parse a VNN-LIB file (`.gz` compressed too)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise VnnlibError(f"cannot read: {exc}", None, str(path)) from exc
    return parse_vnnlib_text(text, str(path))
