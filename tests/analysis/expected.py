"""Hand-decided algebra of every operator in tests/analysis/ops/ and examples/.

Each entry is what exact arithmetic over the reals says (inputs unconstrained unless the type
is bool or an integer), decided by hand, one comment line per entry giving the reason:
- associativity: "proven" | "refuted" | "assumed" ("assumed": the op says `assume
  associative` and really is associative; an op that assumes it wrongly is "refuted" and
  must fail to compile);
- commutative: whether combine(l, r) == combine(r, l);
- identity: the DSL text of the two-sided identity (declared, or the one a reader would
  infer), or None when no two-sided identity exists;
- structure: "elementwise" (each output entry depends only on the matching entries of the
  broadcast fields; scalar fields always qualify), "affine" (not elementwise, but linear in
  the earlier element's fields), "general" otherwise.
"""


def _entry(associativity, commutative, identity, structure):
    return dict(associativity=associativity, commutative=commutative,
                identity=identity, structure=structure)


EXPECTED = {
    # ---- tests/analysis/ops/ ----
    # Agg(l, r) = l: both bracketings keep the leftmost; right identities only.
    "first": _entry("proven", False, None, "elementwise"),
    # Agg(l, r) = r: both bracketings keep the rightmost; left identities only.
    "last": _entry("proven", False, None, "elementwise"),
    # (1 - 1) - 1 = -1 != 1 = 1 - (1 - 1); 0 is only a right identity.
    "subtract": _entry("refuted", False, None, "elementwise"),
    # ((0 + 0)/2 + 4)/2 = 2 != 1 = (0 + (0 + 4)/2)/2; (e + x)/2 = x forces e = x.
    "mean_of_two": _entry("refuted", True, None, "elementwise"),
    # max is a commutative monoid with identity -inf.
    "maximum": _entry("proven", True, "-inf", "elementwise"),
    # min is a commutative monoid with identity inf.
    "minimum": _entry("proven", True, "inf", "elementwise"),
    # complex multiplication is associative and commutative, unit 1 + 0i; scalar fields.
    "complex_mul": _entry("proven", True, "(1.0, 0.0)", "elementwise"),
    # first minimum wins: associative; ties keep the left index, so not commutative.
    "argmin_first": _entry("proven", False, "(inf, 0)", "elementwise"),
    # last minimum wins: associative; ties keep the right index, so not commutative.
    "argmin_last": _entry("proven", False, "(inf, 0)", "elementwise"),
    # 2x2 matrix product: associative, not commutative; four scalar fields, so elementwise.
    "matmul2x2": _entry("proven", False, "(1.0, 0.0, 0.0, 1.0)", "elementwise"),
    # composition of affine maps (A, b): associative, not commutative, matmul linear in l.
    "affine_matrix": _entry("proven", False, "(eye(D), zeros)", "affine"),
    # matrix product M_l M_r: associative, not commutative, linear in l across entries.
    "matrix_chain": _entry("proven", False, "eye(D)", "affine"),
    # (m, s) stands for s * exp(m); combine adds those: associative, symmetric.
    "online_softmax": _entry("proven", True, "(-inf, 0.0)", "elementwise"),
    # Chan's merge is addition of (n, n mean, M2 + n mean^2); symmetric after simplifying.
    "welford_merge": _entry("proven", True, "(0.0, 0.0, 0.0)", "elementwise"),
    # classic segmented scan: associative; the later reset wins, so not commutative.
    "segmented_add": _entry("proven", False, "(false, 0.0)", "elementwise"),
    # (1, 1, -1): 0 != 1; symmetric in l, r; Agg(e, 2) = min(e + 2, 1) != 2 for every e.
    "saturating_add": _entry("refuted", True, None, "elementwise"),
    # (1, 0, 0): 0.49 != 0.7; 0.7 l + 0.3 r is not symmetric; e would have to equal x.
    "ema_mix": _entry("refuted", False, None, "elementwise"),
    # tanh([l | r] W) for generic W: not associative, not symmetric, matmul across entries.
    "concat_rnn": _entry("refuted", False, None, "general"),
    # residual attention over [l | r] keeping r's rows: not associative, not symmetric.
    "attention_merge": _entry("refuted", False, None, "general"),
    # l + r + l r = (1 + l)(1 + r) - 1 is associative and symmetric; declared, so "assumed".
    "assumed_ok": _entry("assumed", True, "0.0", "elementwise"),
    # l + 2 r: (0, 0, 1) gives 2 != 4, so the assumption is refuted (a compile error).
    "assumed_bad": _entry("refuted", False, None, "elementwise"),
    # multiplication is a commutative monoid with identity 1.
    "product": _entry("proven", True, "1.0", "elementwise"),
    # log(exp(l) + exp(r)) is + in the log domain: commutative monoid, identity -inf.
    "logsumexp_pair": _entry("proven", True, "-inf", "elementwise"),
    # or is a commutative monoid on bool with identity false.
    "bool_or": _entry("proven", True, "false", "elementwise"),
    # and is a commutative monoid on bool with identity true.
    "bool_and": _entry("proven", True, "true", "elementwise"),
    # != on bool is xor, addition mod 2: commutative monoid with identity false.
    "bool_xor": _entry("proven", True, "false", "elementwise"),
    # (2 ** 1) ** 2 = 4 != 2 = 2 ** (1 ** 2); 2 ** 1 != 1 ** 2; 1 is only a right identity.
    "power": _entry("refuted", False, None, "elementwise"),
    # integer addition is a commutative monoid with identity 0.
    "int_add": _entry("proven", True, "0", "elementwise"),
    # composition of tropical maps x -> max(x + a, b): associative, not commutative.
    "max_plus": _entry("proven", False, "(0.0, -inf)", "elementwise"),
    # |l - r|: (1, 2, 3) gives 2 != 0; symmetric; Agg(0, -1) = 1, so 0 is no identity.
    "abs_diff": _entry("refuted", True, None, "elementwise"),
    # diagonal linear recurrence on vectors: associative, not commutative.
    "gated_vector": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # composition of S -> S G + B: associative, not commutative, linear in l via matmul.
    "right_affine": _entry("proven", False, "(eye(D), zeros)", "affine"),
    # ---- examples/ ----
    # diagonal gate times matrix state plus outer product: the affine template, broadcast.
    "gla": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # (max, argmax) with the earliest index on ties: associative, ties break symmetry.
    "running_argmax": _entry("proven", False, "(-inf, 0)", "elementwise"),
    # (m, s) stands for s * exp(m); combine adds those: associative, symmetric.
    "logcumsumexp": _entry("proven", True, "(-inf, 0.0)", "elementwise"),
    # affine maps (E, S) composed by matmul: associative, not commutative, linear in l.
    "delta_rule": _entry("proven", False, "(eye(K), zeros)", "affine"),
    # diagonal gate (exp(-exp(w))) and outer product: the broadcast affine template.
    "rwkv6": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # 0.9 l + 0.1 r: (1, 0, 0) gives 0.81 != 0.9; not symmetric; no identity.
    "ema": _entry("refuted", False, None, "elementwise"),
    # tanh(l W1 + r W2 + b) for generic params: not associative, not symmetric, matmul.
    "tree_rnn": _entry("refuted", False, None, "general"),
    # transformer block over [l | r]: not associative; `zeros` is declared only as the empty
    # prefix for the exclusive readout, it is not a two-sided identity of combine.
    "transformer_psm": _entry("refuted", False, None, "general"),
    # addition: commutative monoid with identity 0.
    "cumsum": _entry("proven", True, "0.0", "elementwise"),
    # Chan's merge is addition of (n, n mean, M2 + n mean^2): associative, symmetric.
    "welford": _entry("proven", True, "(0.0, 0.0, 0.0)", "elementwise"),
    # scalar affine maps h -> a h + x composed: associative, not commutative.
    "linear_recurrence": _entry("proven", False, "(1.0, 0.0)", "elementwise"),
    # diagonal affine maps per state entry (Mamba S6): associative, not commutative.
    "selective_ssm": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # scalar gate times matrix state plus outer product: associative, not commutative.
    "retention": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # scalar gate times matrix state plus outer product: associative, not commutative.
    "simple_gla": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # simple_gla's recurrence; the readout's skip term D x does not touch combine.
    "mamba2": _entry("proven", False, "(ones, zeros)", "elementwise"),
    # matrix addition: commutative monoid with identity zeros.
    "linear_attention": _entry("proven", True, "zeros", "elementwise"),
    # scalar forget gate applied to C and n alike: associative, not commutative.
    "mlstm": _entry("proven", False, "(ones, zeros, zeros)", "elementwise"),
    # gated delta rule maps composed by matmul: associative, not commutative, linear in l.
    "gated_delta_rule": _entry("proven", False, "(eye(K), zeros)", "affine"),
    # two gated delta steps per token, composed the same way.
    "gated_delta_product": _entry("proven", False, "(eye(K), zeros)", "affine"),
    # the same composition of affine maps, E diagonal plus rank one (RWKV-7, KDA).
    "rwkv7": _entry("proven", False, "(eye(K), zeros)", "affine"),
    "kda": _entry("proven", False, "(eye(K), zeros)", "affine"),
    # classic segmented scan: associative; the later reset wins, so not commutative.
    "segmented_sum": _entry("proven", False, "(false, 0.0)", "elementwise"),
    # (m, s, acc) stands for (s, acc) * exp(m); combine adds those: associative, symmetric.
    "softmax_pool": _entry("proven", True, "(-inf, 0.0, zeros)", "elementwise"),
}
