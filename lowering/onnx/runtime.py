"""Running an exported model with onnxruntime (CPU execution provider): the input flattening
(:func:`onnx_inputs`), sessions and single runs (:func:`make_session`, :func:`run_onnx`), the
MoDiff state layout of a stateful export (:func:`state_spec`) and :class:`StatefulSession`,
which carries the caches across a sampling trajectory, plus the latency helpers
(:func:`time_ms`, :func:`compare_latency`).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from .common import STATE_KEY, log


def onnx_inputs(args: tuple, kwargs: dict | None = None) -> list[np.ndarray]:
    """The tensors of ``(args, kwargs)`` in the order the exported model takes them (numpy)."""
    out = []
    for t in pytree.tree_leaves((tuple(args), dict(kwargs or {}))):
        if isinstance(t, torch.Tensor):
            out.append(t.detach().cpu().numpy())
    return out


def make_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU execution provider."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, *inputs: Any, session=None) -> list[np.ndarray]:
    """Run an exported model with onnxruntime (CPU EP); returns every output as numpy.

    ``inputs`` are tensors or arrays in the model's input order (:func:`onnx_inputs` flattens
    ``(args, kwargs)`` the way the exporter did). Pass ``session`` (:func:`make_session`) to
    reuse one across calls.
    """
    sess = session or make_session(path)
    names = [i.name for i in sess.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"run_onnx: the model takes {len(names)} inputs {names}, got {len(inputs)}")
    feed = {}
    for name, x in zip(names, inputs):
        feed[name] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return list(sess.run(None, feed))


def state_spec(path_or_model) -> dict | None:
    """The MoDiff state layout of an exported model (see :func:`stateful._join_first_step`), or None (stateless)."""
    import json

    import onnx

    m = onnx.load(os.fspath(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model
    for p in m.metadata_props:
        if p.key == STATE_KEY:
            return json.loads(p.value)
    return None


def _resolve_dim(d, env: dict[str, int]) -> int | None:
    """A cache dim from the session's input metadata: an int, a symbol or an expression of the
    model inputs' symbols; None when the inputs do not determine it."""
    import re

    if isinstance(d, int):
        return d
    expr = str(d)
    if expr in env:
        return env[expr]
    funcs = {"floor": math.floor, "ceil": math.ceil, "min": min, "max": max}
    unknown = set(re.findall(r"[A-Za-z_]\w*", expr)) - env.keys() - funcs.keys()
    if unknown or not re.fullmatch(r"[\w+\-*/%(), ]+", expr):
        return None
    return int(eval(expr, {"__builtins__": {}}, {**funcs, **env}))  # noqa: S307 - names and chars checked above


class StatefulSession:
    """Run a MoDiff-quantized ONNX export over a sampling trajectory with onnxruntime.

    Holds the caches between calls: the first call after construction or :meth:`reset` feeds
    ``first_step = True`` (float step; â/ô seeded), every later call the integer path with the
    caches the previous call returned. Like the PyTorch model, a batch or shape change in the
    middle of a trajectory raises (``on_shape_change="error"``) or starts a new trajectory
    (``"reseed"``); caches are never broadcast.

    Example:
        >>> sess = StatefulSession("unet_w8a8.onnx")
        >>> with sess.trajectory():
        ...     for t in timesteps:
        ...         (eps,) = sess(x_t, t)
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, on_shape_change: str = "error",
                 session=None) -> None:
        if on_shape_change not in ("error", "reseed"):
            raise ValueError(f"StatefulSession: on_shape_change must be 'error' or 'reseed', got {on_shape_change!r}")
        spec = state_spec(path)
        if spec is None:
            raise ValueError(f"StatefulSession: {os.fspath(path)} carries no MoDiff state (export a quantized model, "
                             "or run the file with run_onnx)")
        self.path, self.spec, self.on_shape_change = os.fspath(path), spec, on_shape_change
        self.session = session or make_session(path, threads=threads)
        ins = self.session.get_inputs()
        self._model_in = ins[:spec["model_inputs"]]
        by_name = {i.name: i for i in ins}
        self._cache_in = [by_name[c["input"]] for c in spec["caches"]]
        self._out_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    @property
    def first_step(self) -> bool:
        """True when the next call starts a trajectory."""
        return self._caches is None

    def reset(self) -> None:
        """Start a new trajectory: the next call is a first step; nothing of the last one is kept."""
        self._caches: list[np.ndarray] | None = None
        self._shapes: list[tuple] | None = None

    @contextlib.contextmanager
    def trajectory(self):
        """``with sess.trajectory():`` resets on entry."""
        self.reset()
        yield self

    def _initial_caches(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        env: dict[str, int] = {}
        for meta, x in zip(self._model_in, feeds):
            for d, n in zip(meta.shape, x.shape):
                if isinstance(d, str):
                    env.setdefault(d, int(n))
        out = []
        for meta, c in zip(self._cache_in, self.spec["caches"]):
            # The first step does not read the caches (the If's float branch): a dim the inputs do
            # not determine (a downsampled size under dynamic_spatial) is fed as 1; the first
            # step's outputs carry the real shapes.
            shape = [_resolve_dim(d, env) or 1 for d in meta.shape]
            out.append(np.zeros(shape, dtype=np.dtype(c["dtype"]) if c["dtype"] != "bfloat16" else np.float32))
        return out

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """One denoiser call; returns the model's outputs (the caches stay inside the session)."""
        n = self.spec["model_inputs"]
        if len(inputs) != n:
            raise ValueError(f"StatefulSession: the model takes {n} inputs {[i.name for i in self._model_in]}, "
                             f"got {len(inputs)}")
        feeds = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        shapes = [f.shape for f in feeds]
        if self._caches is not None and shapes != self._shapes:
            if self.on_shape_change == "error":
                raise ValueError(f"StatefulSession: input shapes {shapes} differ from {self._shapes} in the middle of a "
                                 "trajectory; MoDiff caches are never broadcast. Call reset() (or use `with "
                                 "sess.trajectory():`) before a new batch/shape, or on_shape_change='reseed'.")
            log.warning("StatefulSession: input shapes %s -> %s mid-trajectory; starting a new trajectory", self._shapes,
                        shapes)
            self.reset()
        first = self._caches is None
        caches = self._initial_caches(feeds) if first else self._caches
        feed = {m.name: f for m, f in zip(self._model_in, feeds)}
        feed[self.spec["first_step"]] = np.array(first)
        feed.update({m.name: c for m, c in zip(self._cache_in, caches)})
        outs = self.session.run(None, feed)
        m = self.spec["model_outputs"]
        self._caches, self._shapes = list(outs[m:]), shapes
        return list(outs[:m])


def time_ms(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20) -> list[float]:
    """Wall times of ``reps`` calls of ``fn`` in ms (``time.perf_counter``), after ``warmup`` calls."""
    import time

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def compare_latency(model: torch.nn.Module, args: tuple, kwargs: dict | None, path: str | os.PathLike, *,
                    threads: int | None = None, warmup: int = 3, reps: int = 20) -> dict[str, float]:
    """CPU latency of PyTorch eager ``model(*args, **kwargs)`` vs onnxruntime on ``path``.

    Both run with the same intra-op thread count (``threads``; default: torch's current one),
    under ``torch.no_grad()``, ``warmup`` untimed calls then ``reps`` timed ones
    (``time.perf_counter``). Returns ``{"threads", "eager_ms", "eager_min_ms", "ort_ms",
    "ort_min_ms", "speedup"}`` (medians unless ``_min``; speedup = eager median / ORT median).
    """
    import statistics

    kwargs = dict(kwargs or {})
    threads = threads or torch.get_num_threads()
    timed = lambda fn: time_ms(fn, warmup=warmup, reps=reps)  # noqa: E731
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            te = timed(lambda: model(*args, **kwargs))
    finally:
        torch.set_num_threads(old)
    sess = make_session(path, threads=threads)
    feeds = onnx_inputs(args, kwargs)
    to = timed(lambda: run_onnx(path, *feeds, session=sess))
    e, o = statistics.median(te), statistics.median(to)
    return {"threads": threads, "eager_ms": e, "eager_min_ms": min(te), "ort_ms": o, "ort_min_ms": min(to),
            "speedup": e / o}
