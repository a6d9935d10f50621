"""Bad programs: each reports the right error class, at the right line and column, with a
message that names the problem and a rendered report (source line + caret) that shows it.

The table is the specification of the front end's semantic checks (LANGUAGE.md, "Errors").
Columns are 1-based and point at the start of the offending construct.
"""
from dataclasses import dataclass
from textwrap import dedent

import pytest

from psmc.errors import (PsmcDeclarationError, PsmcError, PsmcLimitError, PsmcNameError, PsmcSyntaxError,
                         PsmcTypeError)
from psmc.ir import ops_from_source
from psmc.ir.lower import MAX_EXPRESSION_DEPTH


@dataclass(frozen=True)
class Bad:
    name: str
    error: type
    line: int
    col: int
    fragment: str
    text: str


def bad(name, error, line, col, fragment, text):
    return Bad(name, error, line, col, fragment, dedent(text).strip("\n"))


# A valid op that cases vary one line of.
BAD = [
    # ---------------------------------------------------------------- names
    bad("unknown builtin", PsmcNameError, 3, 27, "unknown builtin 'foo'", """
        op a {
          state (x: f32);
          combine (l, r) { return foo(l.x); }
        }"""),
    bad("unknown builtin suggests", PsmcNameError, 3, 27, "unknown builtin 'sigmod'", """
        op a {
          state (x: f32);
          combine (l, r) { return sigmod(l.x) + r.x; }
        }"""),
    bad("unknown name", PsmcNameError, 3, 33, "unknown name 'y'", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x + y; }
        }"""),
    bad("unknown field", PsmcNameError, 3, 33, "the state has no field 'y'", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x + r.y; }
        }"""),
    bad("field of a non-element", PsmcNameError, 3, 27, "'.y' is not a field of this value", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x.y; }
        }"""),
    bad("unknown dim in a param", PsmcNameError, 2, 19, "unknown dim 'D'", """
        op a[K] {
          param W: f32[K, D];
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("unknown dim in chunk", PsmcNameError, 2, 9, "unknown dim 'Q'", """
        op a {
          chunk Q;
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("index in combine", PsmcNameError, 3, 33, "'index' (the position) is not available in combine", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x + index; }
        }"""),
    bad("index in identity", PsmcNameError, 4, 14, "not available in identity", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x + r.x; }
          identity = index;
        }"""),
    bad("bare zeros outside identity", PsmcNameError, 3, 33, "bare 'zeros' takes its shape from a state field", """
        op a[K] {
          state (x: f32[K]);
          combine (l, r) { return l.x + zeros; }
        }"""),
    bad("input in identity", PsmcNameError, 5, 14, "unknown name 'u'", """
        op a {
          state (x: f32);
          lift (u: f32) { return u; }
          combine (l, r) { return l.x + r.x; }
          identity = u;
        }"""),
    bad("function used as a value", PsmcNameError, 3, 27, "'exp' is a function", """
        op a {
          state (x: f32);
          combine (l, r) { return exp; }
        }"""),
    # ---------------------------------------------------------------- duplicates
    bad("duplicate dim", PsmcNameError, 1, 9, "duplicate dim 'K'", """
        op a[K, K] {
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("duplicate field", PsmcNameError, 2, 18, "duplicate state field 'x'", """
        op a {
          state (x: f32, x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("duplicate lift input", PsmcNameError, 3, 17, "duplicate lift input 'u'", """
        op a {
          state (x: f32);
          lift (u: f32, u: f32) { return u; }
          combine (l, r) { return l.x; }
        }"""),
    bad("duplicate readout input", PsmcNameError, 4, 23, "duplicate readout input 'y'", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x; }
          readout (s, y: f32, y: f32) { return s.x * y; }
        }"""),
    bad("duplicate param", PsmcNameError, 3, 3, "duplicate param 'W'", """
        op a[D] {
          param W: f32[D];
          param W: f32[D, D];
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("duplicate op", PsmcNameError, 5, 4, "duplicate op 'a'", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x; }
        }
        op a { state (x: f32); combine (l, r) { return r.x; } }"""),
    bad("duplicate fn", PsmcNameError, 2, 4, "duplicate fn 'f'", """
        fn f(x) { return x; }
        fn f(y) { return y; }
        op a { state (x: f32); combine (l, r) { return f(l.x); } }"""),
    bad("duplicate let", PsmcNameError, 5, 9, "'y' is already defined", """
        op a {
          state (x: f32);
          combine (l, r) {
            let y = l.x;
            let y = r.x;
            return y;
          }
        }"""),
    bad("let shadows an element", PsmcNameError, 3, 24, "'l' is already defined", """
        op a {
          state (x: f32);
          combine (l, r) { let l = r.x; return l; }
        }"""),
    bad("input named like a dim", PsmcNameError, 3, 9, "input 'K' has the name of a dim", """
        op a[K] {
          state (x: f32[K]);
          lift (K: f32[K]) { return K; }
          combine (l, r) { return l.x; }
        }"""),
    bad("param named like a dim", PsmcNameError, 2, 3, "param 'K' has the name of a dim", """
        op a[K] {
          param K: f32[K];
          state (x: f32[K]);
          combine (l, r) { return l.x; }
        }"""),
    bad("combine elements with one name", PsmcNameError, 3, 3, "both called 'l'", """
        op a {
          state (x: f32);
          combine (l, l) { return l.x; }
        }"""),
    bad("fn named like a builtin", PsmcNameError, 1, 4, "fn 'exp' has the name of a builtin", """
        fn exp(x) { return x; }
        op a { state (x: f32); combine (l, r) { return l.x; } }"""),
    # ---------------------------------------------------------------- calls
    bad("wrong arity", PsmcTypeError, 3, 27, "max() takes 2 positional arguments, got 1", """
        op a {
          state (x: f32);
          combine (l, r) { return max(l.x); }
        }"""),
    bad("unknown keyword", PsmcTypeError, 3, 36, "sum() has no keyword 'dim'", """
        op a[K] {
          state (x: f32);
          lift (u: f32[K]) { return sum(u, dim=0); }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("keyword given twice", PsmcTypeError, 3, 44, "keyword 'axis' given twice", """
        op a[K] {
          state (x: f32);
          lift (u: f32[K]) { return sum(u, axis=0, axis=0); }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("bool keyword", PsmcTypeError, 3, 59, "'causal' must be true or false", """
        op a[K] {
          state (x: f32[K, K]);
          combine (l, r) { return attention(l.x, r.x, r.x, causal=1); }
        }"""),
    bad("fn arity", PsmcTypeError, 4, 27, "fn 'f' takes 2 arguments, got 1", """
        fn f(x, y) { return x + y; }
        op a {
          state (x: f32);
          combine (l, r) { return f(l.x); }
        }"""),
    bad("recursion in fn", PsmcDeclarationError, 1, 18, "fn 'f' calls itself", """
        fn f(x) { return f(x); }
        op a {
          state (x: f32);
          combine (l, r) { return f(l.x); }
        }"""),
    bad("keyword to a fn", PsmcTypeError, 4, 34, "fn 'f' takes positional arguments only", """
        fn f(x) { return x; }
        op a {
          state (x: f32);
          combine (l, r) { return f(l.x, y=r.x); }
        }"""),
    bad("mutual recursion", PsmcDeclarationError, 2, 18, "fn 'f' calls itself", """
        fn f(x) { return g(x); }
        fn g(x) { return f(x); }
        op a { state (x: f32); combine (l, r) { return f(l.x); } }"""),
    # ---------------------------------------------------------------- shapes and dtypes
    bad("shape mismatch", PsmcTypeError, 4, 40, "shapes [K] and [V] do not broadcast in '+'", """
        op a[K, V] {
          state (x: f32[K]);
          combine (l, r) { return l.x + r.x; }
          lift (u: f32[K], w: f32[V]) { return u + w; }
        }"""),
    bad("matmul mismatch", PsmcTypeError, 4, 49, "shapes [K, V] and [K, V] do not fit in '@': V != K", """
        op a[K, V] {
          state (x: f32[K]);
          combine (l, r) { return l.x + r.x; }
          lift (u: f32[K, V], w: f32[K, V]) { return (u @ w)[0]; }
        }"""),
    bad("matmul of a scalar", PsmcTypeError, 3, 27, "'@' takes vectors and matrices, got shape []", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x @ r.x; }
        }"""),
    bad("state tuple too long", PsmcTypeError, 3, 27, "combine returns 3 values but the state has 2 fields (x, y)", """
        op a {
          state (x: f32, y: f32);
          combine (l, r) { return (l.x, l.y, r.x); }
        }"""),
    bad("tuple for one field", PsmcTypeError, 3, 26, "lift returns 2 values but the state has one field (x)", """
        op a {
          state (x: f32);
          lift (u: f32) { return (u, u); }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("lift result too short", PsmcTypeError, 3, 26, "lift returns 1 value but the state has 2 fields (x, y)", """
        op a {
          state (x: f32, y: f32);
          lift (u: f32) { return u; }
          combine (l, r) { return (l.x, r.y); }
        }"""),
    bad("lift shape not the field's", PsmcTypeError, 3, 29, "lift gives shape [V] for field 'x' of shape [K]", """
        op a[K, V] {
          state (x: f32[K]);
          lift (u: f32[V]) { return u; }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("lift dtype not the field's", PsmcTypeError, 3, 30, "lift gives a f32 value for field 'y' of type bool", """
        op a {
          state (x: f32, y: bool);
          lift (u: f32) { return (u, u); }
          combine (l, r) { return (l.x, r.y); }
        }"""),
    bad("float into an int field", PsmcTypeError, 3, 26, "lift gives a f32 value for field 'x' of type i64", """
        op a {
          state (x: i64);
          lift (u: f32) { return u; }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("combine shape not the field's", PsmcTypeError, 3, 27, "combine gives shape [3] for field 'x' of shape [6]", """
        op a {
          state (x: f32[6]);
          combine (l, r) { return reshape(l.x, (2, 3))[0]; }
        }"""),
    bad("bool arithmetic", PsmcTypeError, 3, 27, "cannot use a bool in '+'", """
        op a {
          state (x: bool);
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("bool compared with a number", PsmcTypeError, 3, 33, "cannot use a bool in '<'", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x < true; }
        }"""),
    bad("bool and number in one select", PsmcTypeError, 3, 28, "cannot combine bool and f32 in 'where()'", """
        op a {
          state (x: f32, b: bool);
          combine (l, r) { return (where(l.b, true, l.x), r.b); }
        }"""),
    bad("logic on numbers", PsmcTypeError, 3, 27, "`and` needs bools, got f32", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x and r.x; }
        }"""),
    bad("not on a number", PsmcTypeError, 3, 31, "`not` needs a bool, got f32", """
        op a {
          state (x: f32);
          combine (l, r) { return not l.x; }
        }"""),
    bad("negated bool", PsmcTypeError, 3, 27, "cannot negate a bool", """
        op a {
          state (x: bool);
          combine (l, r) { return -l.x; }
        }"""),
    bad("condition not bool", PsmcTypeError, 3, 30, "the condition must be a bool, got f32", """
        op a {
          state (x: f32);
          combine (l, r) { return if l.x then l.x else r.x; }
        }"""),
    bad("non-constant index", PsmcTypeError, 3, 39, "an index must be a constant integer", """
        op a[K] {
          state (x: f32);
          lift (u: f32[K], i: i64) { return u[i]; }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("index out of range", PsmcTypeError, 3, 31, "index 3 is out of range for an axis of size 3", """
        op a {
          state (x: f32[3]);
          combine (l, r) { return l.x[3] + r.x; }
        }"""),
    bad("index past a symbolic end", PsmcTypeError, 3, 31, "index K is out of range for an axis of size K", """
        op a[K] {
          state (x: f32[K]);
          combine (l, r) { return l.x[K] + r.x[0]; }
        }"""),
    bad("negative index past the start", PsmcTypeError, 3, 31, "index -4 is out of range for an axis of size 3", """
        op a {
          state (x: f32[3]);
          combine (l, r) { return l.x[-4:] + r.x; }
        }"""),
    bad("empty symbolic slice", PsmcTypeError, 3, 35, "empty slice of an axis of size K", """
        op a[K] {
          state (x: f32[K]);
          combine (l, r) { return sum(l.x[K - 1:K - 1]) + r.x; }
        }"""),
    bad("non-positive size", PsmcTypeError, 3, 39, "a ones() size must be positive, got -1", """
        op a[K] {
          state (x: f32[K]);
          combine (l, r) { return sum(ones(K, -1)) + l.x; }
        }"""),
    bad("non-positive shape entry over dims", PsmcTypeError, 2, 17, "a shape entry must be positive, got 1 - K", """
        op a[K] {
          state (x: f32[1 - K]);
          combine (l, r) { return l.x; }
        }"""),
    bad("integer to a negative power", PsmcTypeError, 3, 27, "an integer to the power -1 is not an integer", """
        op a {
          state (n: i64);
          combine (l, r) { return l.n ** -1 + r.n; }
        }"""),
    bad("too many indices", PsmcTypeError, 3, 27, "too many indices: 1 for shape []", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x[0]; }
        }"""),
    bad("empty slice", PsmcTypeError, 3, 31, "empty slice of an axis of size 2", """
        op a {
          state (x: f32[2]);
          combine (l, r) { return l.x[1:1]; }
        }"""),
    bad("transpose of a vector", PsmcTypeError, 3, 27, "transpose needs a matrix, got shape [3]", """
        op a {
          state (x: f32[3]);
          combine (l, r) { return l.x.T; }
        }"""),
    bad("whole element as a value", PsmcTypeError, 3, 28, "this is a whole element with fields (x, y); pick a field", """
        op a {
          state (x: f32, y: f32);
          combine (l, r) { return (l, r); }
        }"""),
    bad("unpack mismatch", PsmcTypeError, 3, 33, "cannot unpack 1 value into 2 names", """
        op a {
          state (x: f32);
          combine (l, r) { let (p, q) = l.x; return p; }
        }"""),
    bad("reshape size mismatch", PsmcTypeError, 3, 27, "cannot reshape [K] (K entries) into [K, 2] (2*K entries)", """
        op a[K] {
          state (x: f32[K]);
          combine (l, r) { return reshape(l.x, (K, 2))[0]; }
        }"""),
    bad("concat mismatch", PsmcTypeError, 3, 39, "shapes [K, V] and [V, K] differ off that axis", """
        op a[K, V] {
          state (x: f32[K, V]);
          combine (l, r) { return concat(l.x, transpose(r.x), axis=0)[K:]; }
        }"""),
    bad("split not even", PsmcTypeError, 3, 36, "split() cannot cut an axis of size 4 into 3 equal parts", """
        op a {
          state (x: f32[4]);
          combine (l, r) { let (p, q, z) = split(l.x, 3); return p; }
        }"""),
    bad("attention width mismatch", PsmcTypeError, 3, 27, "attention(): q [K, V] and k [V, K] need the same width", """
        op a[K, V] {
          state (x: f32[K, V]);
          combine (l, r) { return attention(l.x, transpose(r.x), r.x); }
        }"""),
    bad("attention heads", PsmcTypeError, 3, 27, "attention(): width 6 is not divisible by heads=4", """
        op a {
          state (x: f32[2, 6]);
          combine (l, r) { return attention(l.x, r.x, r.x, heads=4); }
        }"""),
    bad("axis out of range", PsmcTypeError, 3, 29, "axis 2 is out of range for a value of rank 1", """
        op a {
          state (x: f32);
          lift (u: f32[4]) { return sum(u, axis=2); }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("outer of a matrix", PsmcTypeError, 3, 33, "outer() takes two vectors, got shape [2, 2]", """
        op a {
          state (x: f32[2, 2]);
          combine (l, r) { return outer(l.x, r.x); }
        }"""),
    bad("eye of a value", PsmcTypeError, 3, 37, "the size of eye() must be a constant integer", """
        op a[K] {
          state (x: f32[K]);
          combine (l, r) { return l.x + eye(l.x); }
        }"""),
    bad("zero-sized shape", PsmcTypeError, 2, 17, "a shape entry must be positive, got 0", """
        op a {
          state (x: f32[0]);
          combine (l, r) { return l.x; }
        }"""),
    bad("shape literal too large (a fuzz mutant, seed 5132852: was an internal OverflowError)", PsmcTypeError, 3, 16,
        "a shape entry of 99999999999999999999 is too large for a literal (at most 1,048,576)", """
        op a {
          state (x: f32);
          lift (b: f32[99999999999999999999]) { return b[0]; }
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("integer literal too large", PsmcTypeError, 3, 33, "integer literal does not fit in i64", """
        op a {
          state (x: i64);
          combine (l, r) { return l.x + 99999999999999999999; }
        }"""),
    bad("an input declared differently in lift and readout", PsmcTypeError, 5, 15,
        "input 'u' is f32 here but f32[K] in lift", """
        op a[K] {
          state (x: f32[K]);
          lift (u: f32[K]) { return u; }
          combine (l, r) { return l.x + r.x; }
          readout (s, u: f32) { return s.x * u; }
        }"""),
    # ---------------------------------------------------------------- identity
    bad("identity with too many values", PsmcTypeError, 4, 14, "the identity has 3 values but the state has 2 fields", """
        op a {
          state (x: f32, y: f32);
          combine (l, r) { return (l.x + r.x, l.y + r.y); }
          identity = (0.0, 0.0, 1.0);
        }"""),
    bad("identity with one value for two fields", PsmcTypeError, 4, 14,
        "the identity has 1 value but the state has 2 fields", """
        op a {
          state (x: f32, y: f32);
          combine (l, r) { return (l.x + r.x, l.y + r.y); }
          identity = 0.0;
        }"""),
    bad("identity of the wrong shape", PsmcTypeError, 4, 14, "the identity gives shape [4] for field 'x' of shape [3]", """
        op a {
          state (x: f32[3]);
          combine (l, r) { return l.x + r.x; }
          identity = zeros(4);
        }"""),
    bad("identity of the wrong dtype", PsmcTypeError, 4, 20, "the identity gives a f32 value for field 'n' of type i64", """
        op a {
          state (x: f32, n: i64);
          combine (l, r) { return (l.x + r.x, l.n + r.n); }
          identity = (0.0, 0.5);
        }"""),
    # ---------------------------------------------------------------- declarations
    bad("combine missing", PsmcDeclarationError, 1, 4, "op 'a' has no combine", """
        op a {
          state (x: f32);
          lift (u: f32) { return u; }
        }"""),
    bad("state missing", PsmcDeclarationError, 1, 4, "op 'a' has no state declaration", """
        op a {
          lift (u: f32) { return u; }
          combine (l, r) { return l.x; }
        }"""),
    bad("combine twice", PsmcDeclarationError, 4, 3, "op 'a' declares combine twice", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x; }
          combine (l, r) { return r.x; }
        }"""),
    bad("readout exclusive without identity", PsmcDeclarationError, 4, 3,
        "`readout exclusive` needs a declared identity", """
        op a {
          state (x: f32);
          combine (l, r) { return l.x + r.x; }
          readout exclusive (p) { return p.x; }
        }"""),
    bad("chunk op lift input without the chunk axis", PsmcTypeError, 4, 9,
        "lift input 'u' has type f32[D], but a chunk op's inputs take a whole chunk", """
        op a[C, D] {
          chunk C;
          state (x: f32[D]);
          lift (u: f32[D]) { return u; }
          combine (l, r) { return l.x + r.x; }
          identity = zeros;
          readout exclusive (p, y: f32[C, D]) { return y; }
        }"""),
    bad("chunk op readout input without the chunk axis", PsmcTypeError, 7, 25,
        "readout input 'y' has type f32[D], but a chunk op's inputs take a whole chunk", """
        op a[C, D] {
          chunk C;
          state (x: f32[D]);
          lift (u: f32[C, D]) { return sum(u, axis=0); }
          combine (l, r) { return l.x + r.x; }
          identity = zeros;
          readout exclusive (p, y: f32[D]) { return y; }
        }"""),
    bad("chunk op without lift: fields lack the chunk axis", PsmcTypeError, 3, 10,
        "state field (the op has no lift) 'x' has type f32", """
        op a[C] {
          chunk C;
          state (x: f32);
          combine (l, r) { return l.x + r.x; }
          identity = zeros;
          readout exclusive (p, y: f32[C]) { return y; }
        }"""),
    bad("inclusive readout in a chunk op", PsmcDeclarationError, 7, 3, "a chunk op's readout must be `readout exclusive`", """
        op a[C, D] {
          chunk C;
          state (x: f32[C, D]);
          lift (u: f32[C, D]) { return u; }
          combine (l, r) { return l.x + r.x; }
          identity = zeros;
          readout (s, y: f32[C, D]) { return y; }
        }"""),
    bad("chunk op without readout", PsmcDeclarationError, 1, 4, "chunk op 'a' needs a `readout exclusive", """
        op a[C] {
          chunk C;
          state (x: f32[C]);
          combine (l, r) { return l.x + r.x; }
        }"""),
    bad("chunk readout returns one value", PsmcTypeError, 5, 45, "a chunk readout returns one row per token", """
        op a[C] {
          chunk C;
          state (x: f32[C]);
          combine (l, r) { return l.x + r.x; } identity = zeros;
          readout exclusive (p, y: f32[C]) { return sum(y); }
        }"""),
    bad("bad param init", PsmcDeclarationError, 2, 24, "unknown param initialiser", """
        op a[K, V] {
          param W: f32[K, V] = gaussian;
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("param init with a wrong argument count", PsmcDeclarationError, 2, 21, "unknown param initialiser", """
        op a[K] {
          param W: f32[K] = normal(0.1, 0.2);
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("xavier on a vector", PsmcDeclarationError, 2, 21, "xavier needs a matrix", """
        op a[K] {
          param b: f32[K] = xavier;
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("negative std", PsmcDeclarationError, 2, 28, "normal(std) needs std >= 0", """
        op a[K] {
          param b: f32[K] = normal(-1.0);
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("infinite init argument", PsmcDeclarationError, 2, 28, "number literal is too large", """
        op a[K] {
          param b: f32[K] = normal(1e400);
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    bad("integer param", PsmcTypeError, 2, 12, "param 'W' must be a float type, not i32", """
        op a {
          param W: i32[2, 2];
          state (x: f32);
          combine (l, r) { return l.x; }
        }"""),
    # ---------------------------------------------------------------- limits
    # the report points at the first call past the limit: `exp(` is 4 characters a level
    bad("nesting limit", PsmcLimitError, 3, 27 + 4 * MAX_EXPRESSION_DEPTH, "nested more than", """
        op a {
          state (x: f32);
          combine (l, r) { return EXPR; }
        }""".replace("EXPR", "exp(" * 200 + "l.x" + ")" * 200)),
]


def test_the_table_is_big_enough():
    assert len(BAD) >= 30
    assert len({b.name for b in BAD}) == len(BAD)
    assert {b.error for b in BAD} >= {PsmcNameError, PsmcTypeError, PsmcDeclarationError, PsmcLimitError}


@pytest.mark.parametrize("case", BAD, ids=lambda b: b.name)
def test_bad_program(case):
    with pytest.raises(PsmcError) as info:
        ops_from_source(case.text, "bad.psm")
    err = info.value
    assert type(err) is case.error, str(err)
    assert (err.line, err.col) == (case.line, case.col), str(err)
    assert case.fragment in err.message, str(err)
    rendered = str(err)
    source_line = case.text.splitlines()[case.line - 1]
    head, shown_line, carets = rendered.splitlines()[:3]
    assert head == f"bad.psm:{case.line}:{case.col}: {err.message}"
    assert shown_line == "    " + source_line
    assert carets.startswith("    " + " " * (case.col - 1) + "^") and set(carets.strip()) == {"^"}
    # carets never run past the source line
    assert len(carets) <= max(len(shown_line), 4 + case.col)


def test_every_semantic_error_says_what_to_do():
    # Limit and analysis errors aside, each report ends with a hint or a note that points elsewhere.
    missing = []
    for case in BAD:
        try:
            ops_from_source(case.text, "bad.psm")
        except PsmcError as err:
            if not err.hint and not err.notes:
                missing.append(case.name)
    assert missing == []


def test_notes_point_at_the_first_declaration():
    case = next(b for b in BAD if b.name == "duplicate field")
    with pytest.raises(PsmcNameError) as info:
        ops_from_source(case.text, "bad.psm")
    (note, span), = info.value.notes
    assert "first declared here" in note and (span.line, span.col) == (2, 10)
    assert "bad.psm:2:10: note: 'x' was first declared here" in str(info.value)


def test_error_inside_fn_names_the_call_site():
    text = dedent("""
        fn f(x) { return x + undefined_name; }
        op a {
          state (x: f32);
          combine (l, r) { return f(l.x); }
        }""").strip("\n")
    with pytest.raises(PsmcNameError) as info:
        ops_from_source(text, "bad.psm")
    err = info.value
    assert (err.line, err.col) == (1, 22)
    (note, span), = err.notes
    assert note == "in fn 'f', called from here" and (span.line, span.col) == (4, 27)


def test_suggestions_for_near_misses():
    for case_name, suggestion in (("unknown builtin suggests", "'sigmoid'"),):
        case = next(b for b in BAD if b.name == case_name)
        with pytest.raises(PsmcError) as info:
            ops_from_source(case.text)
        assert suggestion in info.value.hint
    with pytest.raises(PsmcNameError) as info:
        ops_from_source("op a { state (value: f32); combine (l, r) { return l.valeu; } }")
    assert "did you mean 'value'" in info.value.hint


def test_syntax_errors_come_through_ops_from_source():
    with pytest.raises(PsmcSyntaxError) as info:
        ops_from_source("op a { state (x: f32) }", "s.psm")
    assert (info.value.line, info.value.col) == (1, 23)
    assert info.value.as_dict() == {"file": "s.psm", "line": 1, "col": 23, "message": info.value.message,
                                    "kind": "PsmcSyntaxError"}


def test_first_error_wins_across_ops():
    text = ("op ok { state (x: f32); combine (l, r) { return l.x; } }\n"
            "op broken { state (x: f32); combine (l, r) { return l.x + nope; } }\n"
            "op also_broken { state (x: f32); }\n")
    with pytest.raises(PsmcNameError) as info:
        ops_from_source(text)
    assert info.value.line == 2


@pytest.mark.parametrize("layout,line", [
    ("op a {\n\tstate (x: f32);\n\tcombine (l, r) {\treturn l.x + nope; }\n}", 3),  # tabs
    ("op a {\r\n state (x: f32);\r\n combine (l, r) { return l.x + nope; }\r\n}", 3),  # CRLF
    ("# form\x0cfeed and\u2028separator\nop a {\n state (x: f32);\n combine (l, r) { return l.x + nope; }\n}", 4),
])
def test_caret_under_the_name_whatever_the_layout(layout, line):
    # Lark counts lines at '\n' only and columns in characters; the report must agree.
    with pytest.raises(PsmcNameError) as info:
        ops_from_source(layout, "t.psm")
    _, shown, carets = str(info.value).splitlines()[:3]
    assert info.value.line == line
    start = carets.index("^")
    assert shown[start:start + 4] == "nope" and carets[start:] == "^^^^"
