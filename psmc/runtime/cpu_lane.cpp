// The decode lane of the C++ CPU backend: one token of a bound step (cpu_support.bind_step),
// checked and run from C++.
//
// A bound step knows, from the signature it was bound to, every input's shape, strides and
// dtype, the state fields' shapes and the kernel's integer arguments. What a token still has to
// do is check that its tensors match, collect their addresses, allocate the outputs and the new
// state, and call the kernel. From Python that is ~30 attribute reads and two allocations
// (~4 µs, as long as the kernel itself); here it is a few loads per tensor.
//
// The module is built once per psmc cache (psmc.runtime.cpu_support.decode_lane, with the same
// content-hashed build as the generated kernels) and imported as `_psmc_lane`. Without it (no
// compiler, a failed build) bind_step runs the same checks in Python.
//
//   make(kernel, threads, pointers, ints, inputs, fields, params, outputs, finals, width) -> lane
//   step(lane, inputs, prefix, params, index) -> (outputs, new prefix), or None
//   delta_step(S, q, k, v, beta, log_gate, scale) -> (o, new S), or None
//
// `step` returns None, having run nothing, when anything differs from what the lane was bound
// to; the caller then takes its general path, which handles (or reports) the difference.
// `delta_step` is the delta rule's token (the identity-plus-low-rank class, whose combine the
// generated kernels do not cover: psmc.runtime.delta.delta_rule_step calls it; with tuples of r
// keys, values and strengths, the r steps of a DeltaProduct token, delta_product_step), None
// likewise for tensors it does not cover.
#include <Python.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using Kernel = void (*)(void **, const int64_t *, int);

// A tensor the token passes in: where to find it, where its address goes, what it must be.
struct Expected {
  PyObject *name = nullptr;  // inputs: its key in the inputs dict (a new reference)
  Py_ssize_t position = 0;   // fields, params: its position in the prefix / params tuple
  Py_ssize_t slot = 0;       // its index in the kernel's pointer array
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes, strides;  // strides empty: contiguous
};

// A tensor the kernel writes: a fresh one per token.
struct Made {
  Py_ssize_t slot = 0, position = 0;  // pointer slot; position in the new prefix (finals)
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes;
};

struct Lane {
  Kernel kernel = nullptr;
  int threads = 1;
  std::vector<void *> pointers;  // the scratch addresses; a token fills the rest
  std::vector<int64_t> ints;     // ints[5]: the token's index, ints[6]: whether a state is given
  std::vector<Expected> inputs, fields, params;
  std::vector<Made> outputs, finals;
  Py_ssize_t width = 0;  // the new prefix's length (dead fields: None)

  ~Lane() {
    for (auto &e : inputs) Py_XDECREF(e.name);
  }
};

constexpr const char *kCapsule = "psmc.decode_lane";

// ------------------------------------------------------------------ reading make()'s spec
// read(item, i) for each item of the sequence `seq`; false (a Python error set) on a failure.
template <typename Read>
bool read_each(PyObject *seq, Read read) {
  PyObject *fast = PySequence_Fast(seq, "psmc lane: expected a sequence");
  if (fast == nullptr) return false;
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < PySequence_Fast_GET_SIZE(fast); ++i) ok = read(PySequence_Fast_GET_ITEM(fast, i), i);
  Py_DECREF(fast);
  return ok && PyErr_Occurred() == nullptr;
}

bool read_ints(PyObject *seq, std::vector<int64_t> &out) {
  out.clear();
  return read_each(seq, [&out](PyObject *item, Py_ssize_t) {
    out.push_back(PyLong_AsLongLong(item));
    return !(out.back() == -1 && PyErr_Occurred());
  });
}

bool read_dtype(PyObject *obj, at::ScalarType &out) {
  if (!THPDtype_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "psmc lane: expected a torch.dtype");
    return false;
  }
  out = reinterpret_cast<THPDtype *>(obj)->scalar_type;
  return true;
}

// inputs: (name, slot, dtype, sizes, strides); fields and params: (position, slot, dtype, sizes)
bool read_expected(PyObject *seq, std::vector<Expected> &out, bool named) {
  out.clear();
  return read_each(seq, [&out, named](PyObject *item, Py_ssize_t) {
    Expected &e = out.emplace_back();
    PyObject *key = nullptr, *dtype = nullptr, *sizes = nullptr, *strides = nullptr;
    const bool ok = named ? PyArg_ParseTuple(item, "UnOOO", &key, &e.slot, &dtype, &sizes, &strides)
                          : PyArg_ParseTuple(item, "nnOO", &e.position, &e.slot, &dtype, &sizes);
    if (!ok) return false;
    if (named) {
      Py_INCREF(key);
      e.name = key;
    }
    return read_dtype(dtype, e.dtype) && read_ints(sizes, e.sizes) && (strides == nullptr || read_ints(strides, e.strides));
  });
}

// outputs: (slot, dtype, sizes); finals: (slot, position, dtype, sizes)
bool read_made(PyObject *seq, std::vector<Made> &out, bool positioned) {
  out.clear();
  return read_each(seq, [&out, positioned](PyObject *item, Py_ssize_t) {
    Made &m = out.emplace_back();
    PyObject *dtype = nullptr, *sizes = nullptr;
    const bool ok = positioned ? PyArg_ParseTuple(item, "nnOO", &m.slot, &m.position, &dtype, &sizes)
                               : PyArg_ParseTuple(item, "nOO", &m.slot, &dtype, &sizes);
    return ok && read_dtype(dtype, m.dtype) && read_ints(sizes, m.sizes);
  });
}

void drop_lane(PyObject *capsule) {
  delete static_cast<Lane *>(PyCapsule_GetPointer(capsule, kCapsule));
}

PyObject *make(PyObject *, PyObject *args) {
  PyObject *kernel, *pointers, *ints, *inputs, *fields, *params, *outputs, *finals;
  int threads;
  Py_ssize_t width;
  if (!PyArg_ParseTuple(args, "OiOOOOOOOn", &kernel, &threads, &pointers, &ints, &inputs, &fields, &params,
                        &outputs, &finals, &width))
    return nullptr;
  auto lane = new Lane();
  lane->kernel = reinterpret_cast<Kernel>(PyLong_AsVoidPtr(kernel));
  lane->threads = threads;
  lane->width = width;
  std::vector<int64_t> addresses;
  bool ok = !PyErr_Occurred() && read_ints(pointers, addresses) && read_ints(ints, lane->ints) &&
            read_expected(inputs, lane->inputs, true) && read_expected(fields, lane->fields, false) &&
            read_expected(params, lane->params, false) && read_made(outputs, lane->outputs, false) &&
            read_made(finals, lane->finals, true);
  if (ok && (lane->kernel == nullptr || lane->ints.size() < 7)) {
    PyErr_SetString(PyExc_ValueError, "psmc lane: no kernel address, or fewer than 7 ints");
    ok = false;
  }
  const auto n = static_cast<Py_ssize_t>(addresses.size());
  auto in_range = [n](Py_ssize_t slot) { return slot >= 0 && slot < n; };
  for (auto *group : {&lane->inputs, &lane->fields, &lane->params})
    for (const auto &e : *group) ok = ok && in_range(e.slot);
  for (auto *group : {&lane->outputs, &lane->finals})
    for (const auto &m : *group) ok = ok && in_range(m.slot);
  for (const auto &e : lane->fields) ok = ok && e.position >= 0 && e.position < width;
  for (const auto &e : lane->params)
    ok = ok && e.position >= 0 && e.position < static_cast<Py_ssize_t>(lane->params.size());
  for (const auto &m : lane->finals) ok = ok && m.position >= 0 && m.position < width;
  if (!ok) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "psmc lane: a pointer slot or position out of range");
    delete lane;
    return nullptr;
  }
  lane->pointers.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) lane->pointers[i] = reinterpret_cast<void *>(addresses[i]);
  PyObject *capsule = PyCapsule_New(lane, kCapsule, drop_lane);
  if (capsule == nullptr) delete lane;
  return capsule;
}

// ------------------------------------------------------------------ one token
// Whether `obj` is a dense CPU tensor of exactly the expected dtype, sizes and strides (or
// contiguous, when no strides are expected). `exact`: a torch.Tensor itself, no subclass.
bool matches(PyObject *obj, const Expected &e, bool exact, void *&address) {
  if (exact ? !THPVariable_CheckExact(obj) : !THPVariable_Check(obj)) return false;
  const at::Tensor &t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.scalar_type() != e.dtype ||
      t.is_conj() || t.is_neg() || t.sizes() != at::IntArrayRef(e.sizes))
    return false;
  if (e.strides.empty() ? !t.is_contiguous() : t.strides() != at::IntArrayRef(e.strides)) return false;
  address = t.data_ptr();
  return true;
}

PyObject *wrap_new(const Made &m, std::vector<void *> &pointers) {
  at::Tensor t = at::detail::empty_cpu(m.sizes, m.dtype, false, std::nullopt);
  pointers[m.slot] = t.data_ptr();
  return THPVariable_Wrap(std::move(t));
}

// step(lane, inputs: dict, prefix: tuple | None, params: tuple, index: int)
PyObject *step(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "psmc lane: step takes (lane, inputs, prefix, params, index)");
    return nullptr;
  }
  auto *lane = static_cast<Lane *>(PyCapsule_GetPointer(args[0], kCapsule));
  if (lane == nullptr) return nullptr;
  PyObject *inputs = args[1], *prefix = args[2], *params = args[3];
  std::vector<void *> pointers = lane->pointers;
  std::vector<int64_t> ints = lane->ints;
  ints[5] = PyLong_AsLongLong(args[4]);
  if (ints[5] == -1 && PyErr_Occurred()) return nullptr;

  // the inputs: exactly the bound names, each as bound
  if (!PyDict_Check(inputs) || PyDict_GET_SIZE(inputs) != static_cast<Py_ssize_t>(lane->inputs.size()))
    Py_RETURN_NONE;
  for (const auto &e : lane->inputs) {
    PyObject *x = PyDict_GetItemWithError(inputs, e.name);  // borrowed
    if (x == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    if (!matches(x, e, true, pointers[e.slot])) Py_RETURN_NONE;
  }
  // the state: None (a stream's first token) or the prefix this op's states hold
  ints[6] = prefix != Py_None;
  if (prefix != Py_None) {
    if (!PyTuple_Check(prefix) || PyTuple_GET_SIZE(prefix) != lane->width) Py_RETURN_NONE;
    for (const auto &e : lane->fields) {
      if (!matches(PyTuple_GET_ITEM(prefix, e.position), e, false, pointers[e.slot])) Py_RETURN_NONE;
    }
  }
  if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != static_cast<Py_ssize_t>(lane->params.size()))
    Py_RETURN_NONE;
  for (const auto &e : lane->params)
    if (!matches(PyTuple_GET_ITEM(params, e.position), e, false, pointers[e.slot])) Py_RETURN_NONE;

  // fresh outputs and new state, then the kernel (without the GIL: the lane is read-only and the
  // pointer array is this call's own)
  PyObject *outs = PyTuple_New(static_cast<Py_ssize_t>(lane->outputs.size()));
  PyObject *fins = PyTuple_New(lane->width);
  if (outs == nullptr || fins == nullptr) {
    Py_XDECREF(outs);
    Py_XDECREF(fins);
    return nullptr;
  }
  try {
    for (size_t i = 0; i < lane->outputs.size(); ++i)
      PyTuple_SET_ITEM(outs, i, wrap_new(lane->outputs[i], pointers));
    for (Py_ssize_t i = 0; i < lane->width; ++i) {
      Py_INCREF(Py_None);
      PyTuple_SET_ITEM(fins, i, Py_None);
    }
    for (const auto &m : lane->finals) {
      PyObject *t = wrap_new(m, pointers);
      PyObject *old = PyTuple_GET_ITEM(fins, m.position);
      PyTuple_SET_ITEM(fins, m.position, t);
      Py_DECREF(old);
    }
  } catch (const std::exception &error) {
    Py_DECREF(outs);
    Py_DECREF(fins);
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Kernel kernel = lane->kernel;
  const int threads = lane->threads;
  Py_BEGIN_ALLOW_THREADS
  kernel(pointers.data(), ints.data(), threads);
  Py_END_ALLOW_THREADS
  PyObject *result = PyTuple_Pack(2, outs, fins);
  Py_DECREF(outs);
  Py_DECREF(fins);
  return result;
}

// ------------------------------------------------------------------ the delta rule's token
// One token of the (gated) delta rule, O(K V) per row, the K x K transition never formed:
//   read = k^T S;  u = beta (v - gate read);  S' = gate S + k u^T;  o = scale q^T S'
// (psmc.runtime.delta.delta_rule_step's torch code, fused: ~8 torch ops per token there).
// With r steps (DeltaProduct: r keys, values and strengths per token) they apply in order to the
// state, which after the first step is updated in place; the gate applies to the first step
// and the output is read after the last (accumulated in its update loop, as for one step).
template <typename T>
void delta_rows(const T *S, const T *q, const std::vector<const T *> &k, const std::vector<const T *> &v,
                const std::vector<const T *> &beta, const T *log_gate, T scale, T *o, T *S_new, int64_t rows,
                int64_t K, int64_t V) {
  const int64_t steps = static_cast<int64_t>(k.size());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * V * steps));  // (cpu_support.GRAIN)
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> read(V), u(V);
    for (int64_t r = begin; r < end; ++r) {
      const T *s = S == nullptr ? nullptr : S + r * K * V;
      const T *qr = q + r * K;
      T *sn = S_new + r * K * V, *orow = o + r * V;
      for (int64_t step = 0; step < steps; ++step) {
        const T *kr = k[step] + r * K, *vr = v[step] + r * V;
        const T b = beta[step][r];
        const T gate = log_gate == nullptr || step > 0 ? T(1) : std::exp(log_gate[r]);
        const bool last = step == steps - 1;
        std::fill(read.begin(), read.end(), T(0));
        if (s != nullptr)
          for (int64_t i = 0; i < K; ++i) {
            const T ki = kr[i];
            for (int64_t j = 0; j < V; ++j) read[j] += ki * s[i * V + j];
          }
        for (int64_t j = 0; j < V; ++j) u[j] = b * (vr[j] - gate * read[j]);
        if (last) std::fill(orow, orow + V, T(0));
        for (int64_t i = 0; i < K; ++i) {
          const T ki = kr[i], qi = qr[i];
          T *row = sn + i * V;
          if (s != nullptr) {
            const T *old = s + i * V;  // (the new state itself after the first step: read before written)
            for (int64_t j = 0; j < V; ++j) row[j] = gate * old[j] + ki * u[j];
          } else {
            for (int64_t j = 0; j < V; ++j) row[j] = ki * u[j];
          }
          if (last)
            for (int64_t j = 0; j < V; ++j) orow[j] += qi * row[j];
        }
        s = sn;
      }
      for (int64_t j = 0; j < V; ++j) orow[j] *= scale;
    }
  });
}

// A dense contiguous CPU torch.Tensor (no subclass) of `dtype` whose shape is `lead` + `tail`.
const at::Tensor *plain(PyObject *obj, at::ScalarType dtype, at::IntArrayRef lead, std::initializer_list<int64_t> tail) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor &t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.scalar_type() != dtype ||
      t.is_conj() || t.is_neg() || !t.is_contiguous() || t.dim() != static_cast<int64_t>(lead.size() + tail.size()))
    return nullptr;
  if (t.sizes().slice(0, lead.size()) != lead) return nullptr;
  size_t i = lead.size();
  for (int64_t n : tail)
    if (t.size(i++) != n) return nullptr;
  return &t;
}

// The tensors of one step argument: a tensor, or a tuple of r (a DeltaProduct token's steps),
// each `plain` with `lead` + `tail`; empty when one is not (or the count is not `steps`).
std::vector<const at::Tensor *> step_tensors(PyObject *arg, at::ScalarType dtype, at::IntArrayRef lead,
                                              std::initializer_list<int64_t> tail, size_t steps) {
  std::vector<const at::Tensor *> out;
  if (!PyTuple_Check(arg)) {
    const at::Tensor *t = steps == 1 ? plain(arg, dtype, lead, tail) : nullptr;
    if (t) out.push_back(t);
    return out;
  }
  if (static_cast<size_t>(PyTuple_GET_SIZE(arg)) != steps) return out;
  for (size_t j = 0; j < steps; ++j) {
    const at::Tensor *t = plain(PyTuple_GET_ITEM(arg, j), dtype, lead, tail);
    if (!t) return {};
    out.push_back(t);
  }
  return out;
}

template <typename T>
std::vector<const T *> data_of(const std::vector<const at::Tensor *> &tensors) {
  std::vector<const T *> out;
  for (const at::Tensor *t : tensors) out.push_back(t->const_data_ptr<T>());
  return out;
}

// delta_step(S | None, q, k, v, beta, log_gate | None, scale) -> (o, new S), or None (nothing
// run) unless every tensor is a contiguous CPU tensor of one dtype (float32 or float64) with the
// same leading axes (no broadcasting): the caller's torch code serves the rest. k, v and beta
// may be tuples of r tensors each: the r steps of a DeltaProduct token, in order.
PyObject *delta_step(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "psmc lane: delta_step takes (S, q, k, v, beta, log_gate, scale)");
    return nullptr;
  }
  const double scale = PyFloat_AsDouble(args[6]);
  if (scale == -1.0 && PyErr_Occurred()) return nullptr;
  const size_t steps = PyTuple_Check(args[2]) ? static_cast<size_t>(PyTuple_GET_SIZE(args[2])) : 1;
  if (steps < 1) Py_RETURN_NONE;
  PyObject *first_v = PyTuple_Check(args[3]) ? (PyTuple_GET_SIZE(args[3]) ? PyTuple_GET_ITEM(args[3], 0) : nullptr)
                                              : args[3];
  if (!THPVariable_CheckExact(args[1])) Py_RETURN_NONE;
  const at::Tensor &q0 = THPVariable_Unpack(args[1]);
  const at::ScalarType dtype = q0.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || q0.dim() < 1) Py_RETURN_NONE;
  const at::IntArrayRef lead = q0.sizes().slice(0, q0.dim() - 1);
  const int64_t K = q0.size(-1);
  if (first_v == nullptr || !THPVariable_CheckExact(first_v)) Py_RETURN_NONE;
  const int64_t V = THPVariable_Unpack(first_v).dim() >= 1 ? THPVariable_Unpack(first_v).size(-1) : -1;
  const at::Tensor *q = plain(args[1], dtype, lead, {K});
  const std::vector<const at::Tensor *> k = step_tensors(args[2], dtype, lead, {K}, steps),
                                        v = step_tensors(args[3], dtype, lead, {V}, steps),
                                        beta = step_tensors(args[4], dtype, lead, {}, steps);
  const at::Tensor *S = args[0] == Py_None ? nullptr : plain(args[0], dtype, lead, {K, V});
  const at::Tensor *g = args[5] == Py_None ? nullptr : plain(args[5], dtype, lead, {});
  if (!q || k.empty() || v.empty() || beta.empty() || (args[0] != Py_None && !S) || (args[5] != Py_None && !g) ||
      V < 0)
    Py_RETURN_NONE;
  const int64_t rows = c10::multiply_integers(lead);
  std::vector<int64_t> o_shape(lead.begin(), lead.end()), s_shape(lead.begin(), lead.end());
  o_shape.push_back(V);
  s_shape.push_back(K);
  s_shape.push_back(V);
  try {
    at::Tensor o = at::detail::empty_cpu(o_shape, dtype, false, std::nullopt);
    at::Tensor S_new = at::detail::empty_cpu(s_shape, dtype, false, std::nullopt);
    Py_BEGIN_ALLOW_THREADS
    if (dtype == at::kFloat) {
      delta_rows<float>(S ? S->const_data_ptr<float>() : nullptr, q->const_data_ptr<float>(), data_of<float>(k),
                        data_of<float>(v), data_of<float>(beta), g ? g->const_data_ptr<float>() : nullptr,
                        static_cast<float>(scale), o.mutable_data_ptr<float>(), S_new.mutable_data_ptr<float>(), rows,
                        K, V);
    } else {
      delta_rows<double>(S ? S->const_data_ptr<double>() : nullptr, q->const_data_ptr<double>(), data_of<double>(k),
                         data_of<double>(v), data_of<double>(beta), g ? g->const_data_ptr<double>() : nullptr, scale,
                         o.mutable_data_ptr<double>(), S_new.mutable_data_ptr<double>(), rows, K, V);
    }
    Py_END_ALLOW_THREADS
    PyObject *out = THPVariable_Wrap(std::move(o));
    PyObject *state = THPVariable_Wrap(std::move(S_new));
    if (out == nullptr || state == nullptr) {
      Py_XDECREF(out);
      Py_XDECREF(state);
      return nullptr;
    }
    PyObject *result = PyTuple_Pack(2, out, state);
    Py_DECREF(out);
    Py_DECREF(state);
    return result;
  } catch (const std::exception &error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"make", make, METH_VARARGS, "make(kernel, threads, pointers, ints, inputs, fields, params, outputs, finals, width)"},
    {"step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(step)), METH_FASTCALL,
     "step(lane, inputs, prefix, params, index) -> (outputs, new prefix), or None"},
    {"delta_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(delta_step)), METH_FASTCALL,
     "delta_step(S, q, k, v, beta, log_gate, scale) -> (o, new S), or None"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_psmc_lane", "psmc's C++ decode lane", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__psmc_lane() { return PyModule_Create(&module); }
