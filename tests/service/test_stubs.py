"""The generated stubs are up to date with protos/ and usable from the one stub package."""

import filecmp

import numpy as np

from service import stubgen


def test_committed_stubs_match_protos(tmp_path):
    out = tmp_path / "protos_gen"
    fresh = stubgen.generate(out)
    rel = sorted(p.relative_to(out) for p in fresh)
    committed = sorted(
        p.relative_to(stubgen.OUT_DIR)
        for p in stubgen.OUT_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert rel == committed, "run ./dev protos: generated file set differs"
    stale = [str(r) for r in rel if not filecmp.cmp(out / r, stubgen.OUT_DIR / r, shallow=False)]
    assert not stale, f"run ./dev protos: stale generated stubs {stale}"


def test_frames_are_packed_float32_bytes():
    from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb

    x = np.arange(6, dtype="<f4").reshape(2, 3)
    msg = pb.StreamRequest(
        frames=pb.Frames(
            first_frame_index=7,
            block=pb.FrameBlock(n_frames=2, n_cells=3, values=x.tobytes(), timestamps=[0.0, 0.1]),
        )
    )
    back = pb.StreamRequest.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == "frames"
    y = np.frombuffer(back.frames.block.values, dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(x, y)
    # packed: 24 bytes of values + small framing, not 6 boxed floats
    assert len(msg.SerializeToString()) < 24 + 40
