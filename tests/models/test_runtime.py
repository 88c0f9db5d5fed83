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


def _masked_sum_model(path, batch="b", tokens="t"):
    """values [B, T, 3] (float), mask [B, T] (bool), session_index [B] (int64) ->
    total [B, 3] = sum of the unmasked tokens' values + session_index, count [B]: padded
    tokens must not count, padded windows must not leak into the real ones."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("values", TensorProto.FLOAT, [batch, tokens, 3]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, [batch, tokens]),
        helper.make_tensor_value_info("session_index", TensorProto.INT64, [batch]),
    ]
    outputs = [
        helper.make_tensor_value_info("total", TensorProto.FLOAT, [batch, 3]),
        helper.make_tensor_value_info("count", TensorProto.FLOAT, [batch]),
    ]
    nodes = [
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax2"], ["m3"]),
        helper.make_node("Mul", ["values", "m3"], ["vm"]),
        helper.make_node("ReduceSum", ["vm", "ax1"], ["s"], keepdims=0),
        helper.make_node("Cast", ["session_index"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["sf", "ax1"], ["sf2"]),
        helper.make_node("Add", ["s", "sf2"], ["total"]),
        helper.make_node("ReduceSum", ["m", "ax1"], ["count"], keepdims=0),
    ]
    inits = [
        helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("ax2", TensorProto.INT64, [1], [2]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(path))
    return path


def _feeds(b, t, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), dtype=bool)
    mask[0, t - 1 :] = False  # the first window has a padded token already
    return {
        "values": rng.normal(size=(b, t, 3)).astype(np.float32),
        "mask": mask,
        "session_index": rng.integers(0, 5, b).astype(np.int64),
    }


def test_runner_with_io_binding_gives_what_a_plain_run_gives(tmp_path):
    from models.runtime import Runner, session_device

    sess = ort_session(_masked_sum_model(tmp_path / "m.onnx"), threads=1)
    assert session_device(sess) == "cpu"
    plain, bound = Runner(sess), Runner(sess, io_binding=True)
    assert not plain.io_binding and bound.io_binding  # binding is the GPU default only
    assert bound.output_names == ["total", "count"]
    for b, t in ((1, 2), (3, 5), (2, 9)):  # shapes change from call to call
        f = _feeds(b, t, seed=b * t)
        want = sess.run(None, f)
        for got in (plain.run(f), bound.run(f)):
            assert [g.shape for g in got] == [(b, 3), (b,)]
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


def test_fixed_shape_runner_pads_into_its_graph_and_returns_the_real_rows(tmp_path):
    from models.runtime import FixedShapeRunner, Runner

    dyn = Runner(ort_session(_masked_sum_model(tmp_path / "d.onnx"), threads=1))
    fixed = FixedShapeRunner(ort_session(_masked_sum_model(tmp_path / "f.onnx", 4, 6)))
    assert (fixed.batch, fixed.tokens) == (4, 6)
    assert fixed.fits(4, 6) and fixed.fits(1, 1) and not fixed.fits(5, 6)
    assert not fixed.fits(4, 7)
    for b, t in ((4, 6), (1, 6), (3, 2), (2, 5), (4, 6)):  # the same buffers, call after call
        f = _feeds(b, t, seed=10 * b + t)
        got, want = fixed.run(f), dyn.run(f)
        assert [g.shape for g in got] == [(b, 3), (b,)]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        fixed.run(_feeds(5, 2))
    with pytest.raises(ValueError, match="does not fit"):
        fixed.run(_feeds(2, 7))
    with pytest.raises(ValueError, match="not a fixed-shape graph"):
        FixedShapeRunner(dyn.session)


def test_cuda_graphs_are_asked_of_the_cuda_provider_only(tmp_path):
    from models.runtime import CUDA, TENSORRT, provider_options

    opts = dict(provider_options([TENSORRT, CUDA, CPU], cuda_graph=True))
    assert opts[CUDA] == {"enable_cuda_graph": "1"}
    assert "enable_cuda_graph" not in opts[TENSORRT] and opts[CPU] == {}
    assert dict(provider_options([CUDA]))[CUDA] == {}
    # without the CUDA provider the option is simply not used
    path = _masked_sum_model(tmp_path / "f.onnx", 2, 3)
    sess = ort_session(path, providers=[CUDA, CPU], cuda_graph=True)
    if CUDA not in ort.get_available_providers():
        assert sess.get_providers() == [CPU]
