// weightsync._entries: the per-sync fast paths that need no torch headers.
//
// 1. Has a tree of dicts kept the very objects it held?
//
// weightsync caches what it derives from a weight tree (a TensorDict's nested dicts, a
// module's _modules/_parameters/_buffers) and must notice, on every sync, an entry that was
// added, removed, renamed or given another object. Python spends 10-25 ns per entry on that
// (list building, type checks that keep foreign __eq__ out); this walk compares pointers, a
// few ns per entry, and runs no Python code of the keys and values it compares. A plain CPython
// extension (no torch): weightsync/tree_identity.py keeps a pure-Python twin with the same
// contract for installs without compiled code.
//
// 2. Calls of a copy plan's C entry points (csrc/copy_plan.h), given their addresses: ctypes
// spends about 0.6 us converting arguments and building its call, as much as 5% of a small
// model's whole push; a METH_FASTCALL function spends a tenth of that.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>

namespace {

// A new reference to what `ref` refers to (nullptr when it died), or to `obj` itself when it
// is not a weak reference.
PyObject* resolve(PyObject* obj) {
  if (!PyWeakref_CheckRefExact(obj)) {
    Py_INCREF(obj);
    return obj;
  }
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* target = nullptr;
  if (PyWeakref_GetRef(obj, &target) < 0) {
    PyErr_Clear();
    return nullptr;
  }
  return target;  // nullptr when dead
#else
  PyObject* target = PyWeakref_GetObject(obj);  // borrowed; Py_None when dead
  if (target == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  if (target == Py_None) return nullptr;
  Py_INCREF(target);
  return target;
#endif
}

// Whether dict `d` holds exactly `keys` -> `values`, in that order. Keys match when they are
// the same object or equal exact strs (a re-inserted key string); values must be the same
// object (`weak`: the object a weak reference in `values` refers to), except at position
// `skip` (-1: none), whose value is not compared.
bool same_dict(PyObject* d, PyObject* keys, PyObject* values, bool weak, Py_ssize_t skip) {
  const Py_ssize_t n = PyTuple_GET_SIZE(keys);
  if (!PyDict_CheckExact(d) || PyDict_GET_SIZE(d) != n || PyTuple_GET_SIZE(values) != n) {
    return false;
  }
  Py_ssize_t pos = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  for (Py_ssize_t i = 0; PyDict_Next(d, &pos, &key, &value); ++i) {
    if (i >= n) return false;
    PyObject* want_key = PyTuple_GET_ITEM(keys, i);
    if (key != want_key) {
      if (!PyUnicode_CheckExact(key) || !PyUnicode_CheckExact(want_key)) return false;
      // Comparing two exact strs runs no user code and cannot fail.
      if (PyUnicode_Compare(key, want_key) != 0) return false;
    }
    if (i == skip) continue;
    PyObject* want = PyTuple_GET_ITEM(values, i);
    if (weak && want != Py_None) {
      PyObject* target = resolve(want);
      Py_XDECREF(target);  // only its address is compared
      if (target == nullptr || target != value) return false;
    } else if (want != value) {
      return false;
    }
  }
  return true;
}

// A dict's version tag: CPython 3.11 gives a dict a new value, taken from one counter that
// only grows, when the dict is created and at every change (insert, delete, a value set,
// clear). So a dict at the same address with the same tag is the same dict holding what it
// held, and the memo need not keep the dict alive (it must not: a module's `_modules` dict
// would keep submodules, and through a back reference the root, alive). The field is
// deprecated from 3.12 and gone in 3.14; dict_versions_work() checks the behaviour once at
// import, and without it the memo is not used.
#if PY_VERSION_HEX < 0x030E0000
#define WEIGHTSYNC_DICT_VERSIONS 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
inline unsigned long long dict_version(PyObject* d) {
  return reinterpret_cast<PyDictObject*>(d)->ma_version_tag;
}
#pragma GCC diagnostic pop
#endif

bool g_dict_versions = false;  // set at import by dict_versions_work()

// Whether this interpreter changes a dict's tag as the memo needs: a fresh one per new dict and
// a new one at each kind of change the walk would notice.
bool dict_versions_work() {
#ifdef WEIGHTSYNC_DICT_VERSIONS
  PyObject* a = PyDict_New();
  PyObject* b = PyDict_New();
  bool ok = a != nullptr && b != nullptr;
  unsigned long long seen[6] = {};
  int n = 0;
  if (ok) {
    seen[n++] = dict_version(a);
    seen[n++] = dict_version(b);
    ok = PyDict_SetItemString(a, "k", Py_None) == 0;
    if (ok) seen[n++] = dict_version(a);  // insert
    ok = ok && PyDict_SetItemString(a, "k", Py_True) == 0;
    if (ok) seen[n++] = dict_version(a);  // a value set
    ok = ok && PyDict_DelItemString(a, "k") == 0;
    if (ok) seen[n++] = dict_version(a);  // delete
    ok = ok && PyDict_SetItemString(a, "k", Py_None) == 0;
    if (ok) {
      PyDict_Clear(a);
      seen[n++] = dict_version(a);  // clear
    }
  }
  for (int i = 1; ok && i < n; ++i) ok = seen[i] > seen[i - 1];  // fresh and growing
  Py_XDECREF(a);
  Py_XDECREF(b);
  PyErr_Clear();
  return ok && n == 6;
#else
  return false;
#endif
}

// Whether `memo` ([address, version, ...] per owner and name, as left by the last walk that
// found every dict the same) still describes the tree: dicts at the same addresses, each with
// the version it had. A few ns per dict instead of a few per entry.
bool memo_holds(PyObject* owners, PyObject* names, PyObject* memo) {
#ifdef WEIGHTSYNC_DICT_VERSIONS
  if (!g_dict_versions) return false;
  const Py_ssize_t n_owners = PyTuple_GET_SIZE(owners);
  const Py_ssize_t n_names = PyTuple_GET_SIZE(names);
  if (PyList_GET_SIZE(memo) != 2 * n_owners * n_names) return false;
  Py_ssize_t k = 0;
  for (Py_ssize_t o = 0; o < n_owners; ++o) {
    PyObject* owner = resolve(PyTuple_GET_ITEM(owners, o));
    if (owner == nullptr) return false;
    for (Py_ssize_t a = 0; a < n_names; ++a, ++k) {
      PyObject* d = PyObject_GetAttr(owner, PyTuple_GET_ITEM(names, a));
      if (d == nullptr) {
        PyErr_Clear();
        Py_DECREF(owner);
        return false;
      }
      const unsigned long long address = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(memo, 2 * k));
      const unsigned long long want = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(memo, 2 * k + 1));
      if (PyErr_Occurred()) PyErr_Clear();  // not ints: a mismatch below
      const bool same = address == reinterpret_cast<std::uintptr_t>(d) && PyDict_CheckExact(d) &&
                        dict_version(d) == want;
      Py_DECREF(d);
      if (!same) {
        Py_DECREF(owner);
        return false;
      }
    }
    Py_DECREF(owner);
  }
  return true;
#else
  (void)owners, (void)names, (void)memo;
  return false;
#endif
}

PyObject* same_entries(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if ((nargs != 3 && nargs != 4) || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1]) ||
      !PyTuple_Check(args[2]) || (nargs == 4 && args[3] != Py_None && !PyList_Check(args[3]))) {
    PyErr_SetString(PyExc_TypeError,
                    "same_entries(owners: tuple, names: tuple, expected: tuple, "
                    "memo: list | None = None)");
    return nullptr;
  }
  PyObject* owners = args[0];
  PyObject* names = args[1];
  PyObject* expected = args[2];
  PyObject* memo = nargs == 4 && args[3] != Py_None ? args[3] : nullptr;
  const Py_ssize_t n_owners = PyTuple_GET_SIZE(owners);
  const Py_ssize_t n_names = PyTuple_GET_SIZE(names);
  if (PyTuple_GET_SIZE(expected) != n_owners * n_names) {
    PyErr_Format(PyExc_ValueError, "expected holds %zd entries, owners x names is %zd",
                 PyTuple_GET_SIZE(expected), n_owners * n_names);
    return nullptr;
  }
  for (Py_ssize_t k = 0; k < n_owners * n_names; ++k) {
    PyObject* item = PyTuple_GET_ITEM(expected, k);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4 ||
        !PyTuple_Check(PyTuple_GET_ITEM(item, 0)) || !PyTuple_Check(PyTuple_GET_ITEM(item, 1)) ||
        !PyBool_Check(PyTuple_GET_ITEM(item, 2)) || !PyLong_Check(PyTuple_GET_ITEM(item, 3))) {
      PyErr_Format(PyExc_TypeError,
                   "expected[%zd] must be a (keys: tuple, values: tuple, weak: bool, skip: int) "
                   "tuple", k);
      return nullptr;
    }
  }
  if (memo != nullptr && memo_holds(owners, names, memo)) Py_RETURN_TRUE;
  // The walk. With a memo, it notes each dict's address and version as it reaches it (before
  // its entries are compared: a change made after that leaves a stale version, which only
  // sends the next call down this walk again) and keeps them when every dict was the same.
  PyObject* fresh = nullptr;
#ifdef WEIGHTSYNC_DICT_VERSIONS
  if (memo != nullptr && g_dict_versions &&
      (fresh = PyList_New(2 * n_owners * n_names)) == nullptr) {
    return nullptr;
  }
#endif
  bool same = true;
  for (Py_ssize_t o = 0; same && o < n_owners; ++o) {
    PyObject* owner = resolve(PyTuple_GET_ITEM(owners, o));
    if (owner == nullptr) {
      same = false;
      break;
    }
    for (Py_ssize_t a = 0; same && a < n_names; ++a) {
      PyObject* d = PyObject_GetAttr(owner, PyTuple_GET_ITEM(names, a));
      if (d == nullptr) {  // an owner without the attribute is not the tree it was
        PyErr_Clear();
        same = false;
        break;
      }
      const Py_ssize_t k = o * n_names + a;
      PyObject* item = PyTuple_GET_ITEM(expected, k);
      const Py_ssize_t skip = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 3));
      if (skip == -1 && PyErr_Occurred()) {
        Py_DECREF(d);
        Py_DECREF(owner);
        Py_XDECREF(fresh);
        return nullptr;
      }
#ifdef WEIGHTSYNC_DICT_VERSIONS
      if (fresh != nullptr && PyDict_CheckExact(d)) {
        PyObject* address = PyLong_FromUnsignedLongLong(reinterpret_cast<std::uintptr_t>(d));
        PyObject* version = PyLong_FromUnsignedLongLong(dict_version(d));
        if (address == nullptr || version == nullptr) {
          Py_XDECREF(address);
          Py_XDECREF(version);
          Py_DECREF(d);
          Py_DECREF(owner);
          Py_DECREF(fresh);
          return nullptr;
        }
        PyList_SET_ITEM(fresh, 2 * k, address);
        PyList_SET_ITEM(fresh, 2 * k + 1, version);
      }
#endif
      same = same_dict(d, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1),
                       PyTuple_GET_ITEM(item, 2) == Py_True, skip);
      Py_DECREF(d);
    }
    Py_DECREF(owner);
  }
  if (memo != nullptr) {
    // Kept only when the whole tree was the same; otherwise emptied (nothing to vouch for).
    PyObject* keep = same ? fresh : nullptr;
    if (PyList_SetSlice(memo, 0, PyList_GET_SIZE(memo), keep) < 0) {
      Py_XDECREF(fresh);
      return nullptr;
    }
  }
  Py_XDECREF(fresh);
  if (same) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// The signatures of weightsync_plan_run and weightsync_plan_prepare (csrc/copy_plan.h).
using PlanRun = int (*)(std::int64_t, int, char*, std::size_t);
using PlanPrepare = void (*)(std::int64_t);
constexpr std::size_t kPlanErrorLen = 4096;

bool int64_args(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, const char* name,
                std::int64_t* out) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < want; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

// plan_run(function, plan, non_blocking): the plan's copy without the GIL; RuntimeError with
// the plan's message (its tag included) when it fails.
PyObject* plan_run(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  std::int64_t a[3];
  if (!int64_args(args, nargs, 3, "plan_run", a)) return nullptr;
  const auto run = reinterpret_cast<PlanRun>(static_cast<std::intptr_t>(a[0]));
  char error[kPlanErrorLen];
  int failed = 0;
  Py_BEGIN_ALLOW_THREADS
  failed = run(a[1], a[2] != 0, error, sizeof error);
  Py_END_ALLOW_THREADS
  if (failed) {
    error[sizeof error - 1] = '\0';
    PyErr_SetString(PyExc_RuntimeError, error);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// plan_prepare(function, plan): never blocks (a clock read, a store, maybe a futex wake), so
// it keeps the GIL.
PyObject* plan_prepare(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  std::int64_t a[2];
  if (!int64_args(args, nargs, 2, "plan_prepare", a)) return nullptr;
  reinterpret_cast<PlanPrepare>(static_cast<std::intptr_t>(a[0]))(a[1]);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"same_entries", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_entries)),
     METH_FASTCALL,
     "same_entries(owners, names, expected, memo=None) -> bool\n\n"
     "For every owner (an object, or a weak reference to one) and attribute name, in order:\n"
     "getattr(owner, name) is an exact dict whose entries are, in order, expected[k] =\n"
     "(keys, values, weak, skip): keys the same objects or equal strs, values the same\n"
     "objects (weak: the objects the weak references in values refer to; None matches\n"
     "None), the value at position skip (-1: none) not compared. False as soon as one\n"
     "differs or an owner died. Runs no code of the compared keys and values.\n"
     "memo: a list the caller keeps with its expected entries (start empty); it records\n"
     "each dict's address and version tag after a walk that found the tree the same, and\n"
     "while they still hold the answer is True without comparing entries. Unused (emptied)\n"
     "when DICT_VERSIONS is False."},
    {"plan_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_run)),
     METH_FASTCALL,
     "plan_run(function, plan, non_blocking) -> None\n\n"
     "Calls weightsync_plan_run at address `function` for the C++ CopyPlan at `plan`,\n"
     "without the GIL. RuntimeError with its message when it fails. Both addresses must\n"
     "come from the loaded weightsync library (weightsync/engine/plan.py)."},
    {"plan_prepare", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_prepare)),
     METH_FASTCALL,
     "plan_prepare(function, plan) -> None\n\n"
     "Calls weightsync_plan_prepare at address `function` for the CopyPlan at `plan`."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_entries",
    "Pointer-identity checks of dict trees (see weightsync/tree_identity.py) and calls of a "
    "copy plan's C entry points (see weightsync/engine/plan.py).", -1, methods,
    nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__entries() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  g_dict_versions = dict_versions_work();
  // Whether same_entries' memo is in use (this interpreter's dict version tags behave).
  if (PyModule_AddObjectRef(module, "DICT_VERSIONS", g_dict_versions ? Py_True : Py_False) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
