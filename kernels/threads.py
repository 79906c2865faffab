"""Numba's threading layer: choose the safe one when fastopt may, detect the one in use,
and keep fastopt's two promises on whichever it is.

The promises: steps from several Python threads at once are safe, and a step in a
``fork()``-ed child is safe. Numba picks its threading layer once per process, at the
first parallel call (its own, or a host's: ``numba.get_num_threads()`` counts), and
never changes it. The layers differ (Numba's documentation, "The Threading Layers"):

=============  ============  ==========================================
layer          thread-safe   fork-safe
=============  ============  ==========================================
``tbb``        yes           yes
``omp``        yes           no with GNU OpenMP (Linux); Intel's is
``workqueue``  no            yes
=============  ============  ==========================================

:func:`configure` (at ``import fastopt``) asks for TBB ("safe") only when nobody
chose yet: not when ``NUMBA_THREADING_LAYER`` is set, not when the host assigned
``numba.config.THREADING_LAYER`` in code, not when Numba's pool already runs. The first
:func:`launch` then reads the layer actually in use and keeps the promises on it:

- ``workqueue`` (not thread-safe): every parallel call of fastopt is serialised by one
  process-wide lock, and a :class:`ThreadingLayerWarning` says so once.
- GNU ``omp`` (not fork-safe): a :class:`ThreadingLayerWarning` says so once; a step in
  a child forked after the pool started raises :class:`ThreadingLayerError` instead of
  letting OpenMP abort the process.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import warnings

import numba
from numba.np.ufunc import parallel as _parallel

HOW_TO_GET_TBB = (
    "to have TBB (thread- and fork-safe), import fastopt before anything else uses Numba's "
    "parallel pool (numba.get_num_threads/set_num_threads or a parallel=True function), "
    "or set NUMBA_THREADING_LAYER=tbb in the environment (pip install tbb)")


class ThreadingLayerWarning(RuntimeWarning):
    """Numba's threading layer in use weakens one of fastopt's promises (see the message)."""


class ThreadingLayerError(RuntimeError):
    """A step cannot run safely on the threading layer in use (see the message)."""


def _preload_tbb() -> bool:
    """Load the pip ``tbb`` wheel's libtbb so Numba's TBB layer finds it; True if loaded.

    The wheel puts libtbb.so.12 in ``<prefix>/lib``, which is not on the loader path of a
    virtual environment; once loaded by soname, Numba's tbbpool links against it.
    """
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for lib in sorted(glob.glob(os.path.join(prefix, "lib", "libtbb.so.12*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False


def _tbb_loadable() -> bool:
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401  (loads the library, starts nothing)
    except ImportError:
        return False
    return True


# Who chose the layer, for `fastopt info` and the warnings (None until configure runs).
chosen_by = None
FASTOPT = "fastopt"
ENVIRONMENT = "the environment (NUMBA_THREADING_LAYER)"
HOST_CODE = "the host's code (numba.config.THREADING_LAYER)"
HOST_POOL = "the host: Numba's pool started before fastopt was imported"
NUMBA_DEFAULT = "Numba's default (TBB could not be loaded)"


def configure() -> str:
    """Ask Numba for the TBB layer unless someone chose already; say who chose.
    Runs once, when ``import fastopt`` imports this module."""
    global chosen_by
    if chosen_by is not None:
        pass
    elif "NUMBA_THREADING_LAYER" in os.environ:
        chosen_by = ENVIRONMENT
    elif _parallel._is_initialized:
        chosen_by = HOST_POOL
    elif str(numba.config.THREADING_LAYER).lower() != "default":
        chosen_by = HOST_CODE
    else:
        _preload_tbb()
        if _tbb_loadable():
            numba.config.THREADING_LAYER = "safe"
            chosen_by = FASTOPT
        else:
            chosen_by = NUMBA_DEFAULT
    return chosen_by


configure()

# The layer in use, read after the first parallel call (None until then).
_layer = None
# True for GNU OpenMP, whose pool cannot run in a forked child.
_fork_unsafe = False
# Set in a child forked from a process whose fork-unsafe pool had started.
_in_unsafe_child = False
_serial = threading.Lock()
_read_lock = threading.Lock()


def in_use() -> str | None:
    """The threading layer Numba runs, or None before its pool started."""
    return _parallel._threading_layer if _parallel._is_initialized else None


def _gnu_openmp() -> bool:
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return False
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child() -> None:
    global _in_unsafe_child
    if _fork_unsafe:
        _in_unsafe_child = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _read_layer() -> None:
    """Record the layer now in use and warn once when it weakens a promise."""
    global _layer, _fork_unsafe
    layer = in_use()
    if layer == "omp" and _gnu_openmp():
        _fork_unsafe = True
        warnings.warn(
            f"fastopt: Numba's threading layer is GNU OpenMP ('omp', chosen by {chosen_by}), "
            f"which cannot run in a fork()-ed child: a step there raises "
            f"ThreadingLayerError. Use multiprocessing's 'spawn' or 'forkserver' start "
            f"method, or {HOW_TO_GET_TBB}.", ThreadingLayerWarning, stacklevel=4)
    elif layer == "workqueue":
        warnings.warn(
            f"fastopt: Numba's threading layer is 'workqueue' (chosen by {chosen_by}), "
            f"which aborts on parallel calls from several threads at once: fastopt "
            f"serialises its steps process-wide. For concurrent steps, {HOW_TO_GET_TBB}.",
            ThreadingLayerWarning, stacklevel=4)
    _layer = layer


def launch(fn, *args):
    """Call the compiled parallel function ``fn(*args)`` under the rules of the layer in use."""
    if _layer == "tbb" or (_layer == "omp" and not _in_unsafe_child):
        return fn(*args)
    if _in_unsafe_child:
        raise ThreadingLayerError(
            "fastopt: this process was fork()-ed from one whose Numba threading layer is GNU "
            "OpenMP, which aborts in a forked child, so the step was not run (nothing "
            "changed). Start workers with multiprocessing's 'spawn' or 'forkserver' method, "
            f"use backend='numpy' in the child, or {HOW_TO_GET_TBB} in the parent.")
    if _layer is not None:  # workqueue: one parallel call at a time in the process
        with _serial:
            return fn(*args)
    with _read_lock:  # the first call: serialised until the layer is known
        out = fn(*args)
        if _layer is None:
            _read_layer()
    return out


def describe() -> str:
    """One line for `fastopt info`: the layer, who chose it, what it promises."""
    layer = in_use()
    if layer is None:
        return f"{numba.config.THREADING_LAYER} (not started yet; chosen by {chosen_by})"
    safety = {"tbb": "thread- and fork-safe",
              "omp": "thread-safe; not fork-safe" if _gnu_openmp() else "thread- and fork-safe",
              "workqueue": "fork-safe; steps serialised (not thread-safe)"}.get(layer, "")
    return f"{layer} ({safety}; chosen by {chosen_by})"
