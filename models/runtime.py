"""ONNX Runtime sessions for a bundle's graph: the one place that sets their options and runs them.

Torch-free (the service's hot path imports it).

Running a session (`Runner`):
- plain ``session.run`` (CPU default);
- I/O binding (``io_binding=True``, the default on CUDA / TensorRT): inputs bound from host
  memory, outputs allocated by ORT on the session's device and copied back once per call;
- a fixed-shape graph (``model.b{B}.t{T}.onnx`` of a bundle exported with ``--fixed-shape BxT``):
  `FixedShapeRunner` owns one device buffer per input and output, bound once; a call copies its
  windows into them, padded to the graph's shape (extra windows repeat the first one, extra tokens
  are zeros with ``mask`` False), runs, and returns the first ``batch`` rows. Fixed addresses and
  shapes are what ORT's CUDA graphs require (``cuda_graph=True`` on the CUDA provider: captured on
  the first run, replayed after). Padding leaves the real windows' outputs unchanged: every window
  is decoded independently, masked tokens take no part.

``DISABLED_OPTIMIZERS`` names ORT graph rewrites that make the exported decoder slower on CPU:
with onnxruntime 1.31 the fused ``SkipLayerNormalization`` kernel that ``SkipLayerNormFusion``
puts at the token embeddings (add + LayerNorm over [batch, cells, dim]) took ~0.2 ms of a 1.2 ms
512-cell window, against ~0.04 ms for the plain Add and LayerNormalization it replaces
(`loadtest.bench_export` measures the graph as served).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion",)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


GPU_PROVIDERS = (TENSORRT, CUDA)


def provider_options(
    providers: Sequence[str],
    *,
    trt_fp16: bool = False,
    trt_cache_dir: str | Path | None = None,
    cuda_graph: bool = False,
) -> list[tuple[str, dict[str, str]]]:
    """``(provider, options)`` for each provider: TensorRT with fp16 on request and its engine
    cache in ``trt_cache_dir`` (engines are built once per graph, shape profile and GPU, then
    reloaded: a first start takes minutes, later ones seconds); CUDA with CUDA graphs on request
    (fixed-shape graphs run through `FixedShapeRunner` only); CPU with defaults."""
    out = []
    for p in providers:
        opts: dict[str, str] = {}
        if p == CUDA and cuda_graph:
            opts["enable_cuda_graph"] = "1"
        if p == TENSORRT:
            opts["trt_fp16_enable"] = "True" if trt_fp16 else "False"
            if trt_cache_dir is not None:
                opts["trt_engine_cache_enable"] = "True"
                opts["trt_engine_cache_path"] = str(trt_cache_dir)
                opts["trt_timing_cache_enable"] = "True"
                opts["trt_timing_cache_path"] = str(trt_cache_dir)
        out.append((p, opts))
    return out


def ort_session(
    model: bytes | str | Path,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    *,
    trt_fp16: bool = False,
    trt_cache_dir: str | Path | None = None,
    cuda_graph: bool = False,
    save_optimized: str | Path | None = None,
):
    """An inference session on ``model`` (bytes or a path): ``threads`` intra-op threads (None =
    ORT's default), every graph optimisation except `DISABLED_OPTIMIZERS`, the ``providers``
    that this onnxruntime build has, in order (CPU when none is asked for or available), with
    `provider_options` (``cuda_graph``: see there); ``save_optimized``: also write the graph as
    optimised (to inspect what runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if save_optimized is not None:
        so.optimized_model_filepath = str(save_optimized)
    avail = set(ort.get_available_providers())
    use = [p for p in (providers or [CPU]) if p in avail] or [CPU]
    if trt_cache_dir is not None and TENSORRT in use:
        Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(
        src,
        sess_options=so,
        providers=provider_options(
            use, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir, cuda_graph=cuda_graph
        ),
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def session_device(session) -> str:
    """Where a session's outputs live: ``"cuda"`` when its first provider is CUDA or TensorRT
    (both hold their tensors in CUDA memory), else ``"cpu"``."""
    providers = session.get_providers()
    return "cuda" if providers and providers[0] in GPU_PROVIDERS else "cpu"


class Runner:
    """Runs a session on feeds of host arrays and returns host arrays, in ``output_names``
    order: through I/O binding (outputs on the session's device, see the module docstring) or
    plain ``run``. ``io_binding=None``: binding on CUDA / TensorRT, plain run on CPU."""

    def __init__(self, session, *, io_binding: bool | None = None, device_id: int = 0):
        self.session = session
        self.device = session_device(session)
        self.device_id = int(device_id)
        self.io_binding = (self.device != "cpu") if io_binding is None else bool(io_binding)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._binding = session.io_binding() if self.io_binding else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._binding is None:
            return self.session.run(None, {k: feeds[k] for k in self.input_names})
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name in self.input_names:
            b.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        for name in self.output_names:
            b.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()


class FixedShapeRunner:
    """A fixed-shape graph run from buffers bound once (see the module docstring): inputs are
    ``[batch, ...]`` with tokens on axis 1 for every input of two or more dimensions (the
    bundle's graphs: ``values``, ``unit_index``, ``timestamps``, ``mask`` and ``session_index``);
    outputs ``[batch, ...]``. `fits` says whether a batch of windows can go through it."""

    def __init__(self, session, *, device_id: int = 0):
        import onnxruntime as ort

        self.session = session
        self.device = session_device(session)
        self.device_id = int(device_id)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        shapes = {i.name: i.shape for i in session.get_inputs()}
        for name, shape in shapes.items():
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise ValueError(f"input {name!r} has shape {shape}: not a fixed-shape graph")
        dims = {tuple(s[:2]) for s in shapes.values() if len(s) >= 2}
        if len(dims) != 1 or any(s[0] != next(iter(dims))[0] for s in shapes.values()):
            raise ValueError(f"inputs {shapes} do not share one [batch, tokens] shape")
        self.batch, self.tokens = next(iter(dims))
        self._binding = session.io_binding()
        self._inputs = {}
        for i in session.get_inputs():
            dtype = _ORT_NUMPY[i.type]
            v = ort.OrtValue.ortvalue_from_shape_and_type(
                list(i.shape), dtype, self.device, self.device_id
            )
            self._inputs[i.name] = (v, dtype)
            self._binding.bind_ortvalue_input(i.name, v)
        for o in session.get_outputs():
            if not all(isinstance(d, int) and d > 0 for d in o.shape):
                raise ValueError(f"output {o.name!r} has shape {o.shape}: not a fixed-shape graph")
            v = ort.OrtValue.ortvalue_from_shape_and_type(
                list(o.shape), _ORT_NUMPY[o.type], self.device, self.device_id
            )
            self._binding.bind_ortvalue_output(o.name, v)

    def fits(self, batch: int, tokens: int) -> bool:
        return 1 <= batch <= self.batch and tokens <= self.tokens

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.asarray(feeds[name]) for name in self.input_names]
        b = int(arrays[0].shape[0])
        t = max((int(a.shape[1]) for a in arrays if a.ndim >= 2), default=0)
        if not self.fits(b, t):
            raise ValueError(
                f"a batch of {b} windows x {t} tokens does not fit this graph "
                f"({self.batch} x {self.tokens})"
            )
        for name, a in zip(self.input_names, arrays, strict=True):
            v, dtype = self._inputs[name]
            v.update_inplace(pad_windows(a.astype(dtype, copy=False), self.batch, self.tokens))
        self.session.run_with_iobinding(self._binding)
        return [o[:b] for o in self._binding.copy_outputs_to_cpu()]


_ORT_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def pad_windows(a: np.ndarray, batch: int, tokens: int) -> np.ndarray:
    """``a`` [b, (t, ...)] -> [batch, (tokens, ...)]: zeros after its tokens, then rows that
    repeat its first window."""
    if a.ndim >= 2 and a.shape[1] < tokens:
        width = [(0, 0), (0, tokens - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, width)
    if a.shape[0] < batch:
        a = np.concatenate([a, np.repeat(a[:1], batch - a.shape[0], axis=0)])
    return np.ascontiguousarray(a)
