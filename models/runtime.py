"""ONNX Runtime sessions for a bundle's graph: the one place that sets their options.

Torch-free (the service's hot path imports it). ``DISABLED_OPTIMIZERS`` names ORT graph
rewrites that make the exported decoder slower on CPU: with onnxruntime 1.31 the fused
``SkipLayerNormalization`` kernel that ``SkipLayerNormFusion`` puts at the token embeddings
(add + LayerNorm over [batch, cells, dim]) took ~0.2 ms of a 1.2 ms 512-cell window, against
~0.04 ms for the plain Add and LayerNormalization it replaces (`loadtest.bench_export` measures
the graph as served).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion",)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def provider_options(
    providers: Sequence[str], *, trt_fp16: bool = False, trt_cache_dir: str | Path | None = None
) -> list[tuple[str, dict[str, str]]]:
    """``(provider, options)`` for each provider: TensorRT with fp16 on request and its engine
    cache in ``trt_cache_dir`` (engines are built once per graph, shape profile and GPU, then
    reloaded: a first start takes minutes, later ones seconds); CUDA and CPU with defaults."""
    out = []
    for p in providers:
        opts: dict[str, str] = {}
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
    save_optimized: str | Path | None = None,
):
    """An inference session on ``model`` (bytes or a path): ``threads`` intra-op threads (None =
    ORT's default), every graph optimisation except `DISABLED_OPTIMIZERS`, the ``providers``
    that this onnxruntime build has, in order (CPU when none is asked for or available), with
    `provider_options`; ``save_optimized``: also write the graph as optimised (to inspect
    what runs)."""
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
        providers=provider_options(use, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir),
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )
