"""`models.runtime.ort_session`: the one place ONNX Runtime sessions get their options."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from models.runtime import CPU, DISABLED_OPTIMIZERS, ort_session  # noqa: E402


def _add_layernorm_model(path):
    """x + y -> LayerNormalization: the pattern SkipLayerNormFusion would fuse."""
    from onnx import TensorProto, helper

    d = 8
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, d]) for n in "xy"]
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, d])
    nodes = [
        helper.make_node("Add", ["x", "y"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "g", "b"], ["z"], axis=-1),
    ]
    inits = [
        helper.make_tensor("g", TensorProto.FLOAT, [d], np.ones(d, np.float32)),
        helper.make_tensor("b", TensorProto.FLOAT, [d], np.zeros(d, np.float32)),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    return path


def test_session_runs_on_cpu_and_falls_back_from_missing_providers(tmp_path):
    path = _add_layernorm_model(tmp_path / "m.onnx")
    sess = ort_session(path, threads=1, providers=["NoSuchExecutionProvider", CPU])
    assert sess.get_providers() == [CPU]
    x = np.random.default_rng(0).normal(size=(1, 4, 8)).astype(np.float32)
    (z,) = sess.run(None, {"x": x, "y": x})
    s = 2 * x
    want = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(z, want, atol=1e-5)
    # bytes work too, and an empty provider list means CPU
    assert ort_session(path.read_bytes(), providers=[]).get_providers() == [CPU]


def test_the_disabled_fusion_is_not_applied(tmp_path):
    path = _add_layernorm_model(tmp_path / "m.onnx")
    assert "SkipLayerNormFusion" in DISABLED_OPTIMIZERS
    plain = tmp_path / "plain.onnx"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(plain)
    ort.InferenceSession(str(path), so, providers=[CPU])  # ORT's defaults fuse the pattern
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(str(plain)).graph.node}

    ours = tmp_path / "ours.onnx"
    ort_session(path, threads=1, save_optimized=ours)
    kept = {n.op_type for n in onnx.load(str(ours)).graph.node}
    assert "SkipLayerNormalization" not in kept and "LayerNormalization" in kept


def test_provider_options_for_tensorrt_cuda_and_cpu(tmp_path):
    from models.runtime import CUDA, TENSORRT, provider_options

    opts = dict(provider_options([TENSORRT, CUDA, CPU], trt_fp16=True, trt_cache_dir=tmp_path))
    assert opts[TENSORRT]["trt_fp16_enable"] == "True"
    assert opts[TENSORRT]["trt_engine_cache_enable"] == "True"
    assert opts[TENSORRT]["trt_engine_cache_path"] == str(tmp_path)
    assert opts[CUDA] == {} and opts[CPU] == {}
    assert dict(provider_options([TENSORRT]))[TENSORRT] == {"trt_fp16_enable": "False"}
    # on a build without them the session still opens, on CPU, and makes no cache directory
    path = _add_layernorm_model(tmp_path / "m.onnx")
    cache = tmp_path / "trt"
    sess = ort_session(path, providers=[TENSORRT, CUDA, CPU], trt_fp16=True, trt_cache_dir=cache)
    if TENSORRT not in ort.get_available_providers():
        assert sess.get_providers() == [CPU] and not cache.exists()
