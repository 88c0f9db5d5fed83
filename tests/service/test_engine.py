"""`service.engine.Engine` on the real ``service_home`` quick bundle (5 Park sessions at 16 Hz and
the simulated 512-cell session at 30 Hz), without Ray or a server.

The reference for ``run()`` is a plain ONNX Runtime session over the bundle's ``model.onnx`` fed
with tokens built here by `models.decoder.tokenizers`, so the engine is checked against the graph
itself, not against its own bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from models.bundle import Bundle, BundleError, write_bundle
from models.decoder.tokenizers import collate, get_tokenizer
from models.tasks import class_names
from service import wire
from service.engine import Engine, WindowItem
from service.ingest import IngestError

FOV1 = "230803_mrcuts24_fov1"  # 28 cells
FOV5 = "230804_mrcuts26_fov5"  # 74 cells
FOV4 = "230809_mrcuts28_fov4"  # 56 cells


@pytest.fixture(scope="module")
def engine(service_home) -> Engine:
    return Engine(service_home.bundle_path)


@pytest.fixture(scope="module")
def recs(service_home) -> dict:
    return {r.session_id: r for r in service_home.recordings}


@pytest.fixture(scope="module")
def ort_session(service_home):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    data = (service_home.bundle_path / "model.onnx").read_bytes()
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def _window(rec, end: int, n: int | None = None):
    """The frames of ``rec`` in the ~1 s ending at frame ``end`` (inclusive) and their times."""
    n = n or int(round(rec.sampling_rate)) + 1
    sl = slice(end - n + 1, end + 1)
    return rec.traces[sl].copy(), rec.timestamps[sl].copy(), float(rec.timestamps[end])


def _item(engine, rec, end, *, session_id=None, unit_ids=None, top_m=0, n=None) -> WindowItem:
    x, t, e = _window(rec, end, n)
    ids = list(rec.unit_ids) if unit_ids is None else unit_ids
    if unit_ids is not None:
        col = {u: j for j, u in enumerate(rec.unit_ids)}
        x = x[:, [col[u] for u in ids]]
    plan = engine.plan(session_id or rec.session_id, ids)
    return WindowItem(plan, x, t, e, top_m)


def _reference(service_home, ort_session, windows):
    """ONNX Runtime outputs for ``[(session_id, unit_ids, values, times, end), ...]`` with every
    unit known and every frame present, tokenized and collated here."""
    b = Bundle.open(service_home.bundle_path)
    dec = b.read_json("config.json")["checkpoint"]["decoder"]
    vocab = b.read_json("vocab.json")
    tok = get_tokenizer(
        dec["tokenizer"], window_s=float(dec["window_s"]), patch_samples=dec["patch_samples"]
    )
    uidx = {u: i for i, u in enumerate(vocab["unit_ids"])}
    sidx = {s: i for i, s in enumerate(vocab["session_ids"])}
    samples, sessions = [], []
    for sid, ids, x, t, end in windows:
        samples.append(tok.tokenize(x, t, end, np.array([uidx[u] for u in ids], np.int64)))
        sessions.append(sidx[sid])
    feeds = collate(samples, sessions)
    names = [o.name for o in ort_session.get_outputs()]
    return dict(zip(names, ort_session.run(None, feeds), strict=True))


def _assert_same(a, b, tol=1e-4, *, masked=True):
    """Two `Decoded` results agree (batch size and timing aside; ``masked=False``: the masked
    fraction too)."""
    if masked:
        assert a.masked_fraction == pytest.approx(b.masked_fraction)
    assert a.n_cells_used == b.n_cells_used
    assert [t.task for t in a.tasks] == [t.task for t in b.tasks]
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        np.testing.assert_allclose(ta.logits, tb.logits, atol=tol, rtol=0)
        np.testing.assert_allclose(ta.probabilities, tb.probabilities, atol=tol, rtol=0)
        assert ta.predicted_class == tb.predicted_class
        assert ta.unexplained == pytest.approx(tb.unexplained, abs=tol)
        assert len(ta.units) == len(tb.units)
        ua = {u.unit: u for u in ta.units}
        ub = {u.unit: u for u in tb.units}
        assert set(ua) == set(ub)
        for k in ua:
            assert ua[k].activation == pytest.approx(ub[k].activation, abs=tol)
            assert ua[k].attribution == pytest.approx(ub[k].attribution, abs=tol)
            assert ua[k].label == ub[k].label


# -- opening the bundle --------------------------------------------------------------------------


def test_engine_ref_and_metadata(engine, service_home):
    b = service_home.bundle
    units_sha = hashlib.sha256((b.path / "units.json").read_bytes()).hexdigest()
    assert engine.ref.name == "default"
    assert engine.ref.version == service_home.version == "v0001"
    assert engine.ref.label_set == f"v0001/units-{units_sha[:12]}"
    assert Engine(b.path, name="served-as").ref.name == "served-as"
    assert engine.providers == ["CPUExecutionProvider"]


def test_engine_tasks_and_class_names(engine, service_home):
    cfg = service_home.bundle.read_json("config.json")
    vocab = service_home.bundle.read_json("vocab.json")
    assert engine.task_names == ("direction", "genetic", "temporal_frequency")
    assert set(engine.task_names) == set(cfg["export"]["tasks"])
    assert engine.class_names["direction"] == tuple(class_names("direction"))
    assert len(engine.class_names["direction"]) == 8
    assert engine.class_names["temporal_frequency"] == ("1Hz", "2Hz", "4Hz", "8Hz", "15Hz")
    assert engine.class_names["genetic"] == tuple(vocab["genetic_classes"])
    assert {"KO", "control"} <= set(engine.class_names["genetic"])
    for t, n in cfg["export"]["tasks"].items():
        assert len(engine.class_names[t]) == n


def test_window_frames(engine):
    assert engine.window_s == 1.0
    assert engine.window_frames(16) == 17
    assert engine.window_frames(30) == 31
    assert engine.window_frames(30.5) == 32
    for hz in (7.5, 16.0, 29.97, 30.0, 60.0):
        n = engine.window_frames(hz)
        # enough frames to span the model window, and not one more than needed
        assert (n - 1) / hz >= engine.window_s - 1e-9
        assert (n - 2) / hz < engine.window_s


@pytest.mark.parametrize("fname", ["model.onnx", "units.json"])
def test_tampered_bundle_is_refused(service_home, tmp_path, fname):
    copy = tmp_path / "bundle"
    shutil.copytree(service_home.bundle_path, copy)
    Engine(copy)  # the intact copy opens
    p = copy / fname
    data = bytearray(p.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x01  # same size, one bit changed
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=fname.replace(".", r"\.")) as ei:
        Engine(copy)
    assert "modified" in str(ei.value)


@pytest.mark.parametrize("fname", ["model.onnx", "units.json"])
def test_file_changed_after_open_is_refused(service_home, tmp_path, fname):
    """The engine loads what it verified: a file swapped between opening and loading is caught."""
    copy = tmp_path / "bundle"
    shutil.copytree(service_home.bundle_path, copy)
    b = Bundle.open(copy)
    p = copy / fname
    p.write_bytes(p.read_bytes() + b" ")
    with pytest.raises(BundleError, match=fname.replace(".", r"\.")):
        Engine(b)


# -- plans ---------------------------------------------------------------------------------------


def test_plan_known_session(engine, recs):
    rec = recs[FOV5]
    p = engine.plan(FOV5, rec.unit_ids)
    assert p.session_known and p.decodable
    assert p.embedding_from == FOV5
    assert p.session_index == engine.vocab.session_ids.index(FOV5)
    assert p.n_known == rec.n_units == 74
    assert p.unit_ids == tuple(rec.unit_ids)
    assert p.unit_index.tolist() == [engine.vocab.unit_ids.index(u) for u in rec.unit_ids]


@pytest.mark.parametrize(
    ("parts", "want"),
    [
        ({FOV5: 30, FOV1: 10}, FOV5),
        ({FOV5: 5, "sim512": 20}, "sim512"),
        ({FOV1: 12, FOV4: 11, FOV5: 3}, FOV1),
    ],
)
def test_plan_unknown_session_borrows_most_overlapping_embedding(engine, recs, parts, want):
    ids = [u for sid, k in parts.items() for u in recs[sid].unit_ids[:k]]
    ids += ["new-rig/cellA", "new-rig/cellB"]
    p = engine.plan("never-seen", ids)
    assert not p.session_known and p.decodable
    assert p.embedding_from == want
    assert p.session_index == engine.vocab.session_ids.index(want)
    assert p.n_known == sum(parts.values())
    assert p.known.tolist() == [True] * sum(parts.values()) + [False, False]
    assert p.unit_index[-2:].tolist() == [-1, -1]


def test_plan_known_session_with_unknown_cells_masks_them(engine, recs):
    ids = list(recs[FOV1].unit_ids) + ["extra/1", "extra/2", "extra/3"]
    p = engine.plan(FOV1, ids)
    assert p.session_known and p.embedding_from == FOV1
    assert p.n_known == 28 and p.known.sum() == 28
    assert not p.known[-3:].any()


def test_plan_without_known_cells_is_not_decodable(engine, recs):
    p = engine.plan("stranger", ["x/1", "x/2", "x/3"])
    assert not p.decodable and not p.session_known
    assert p.session_index == -1 and p.embedding_from == "" and p.n_known == 0
    # a known session id does not help if none of the cells is known
    q = engine.plan(FOV1, ["x/1", "x/2"])
    assert not q.decodable and q.n_known == 0
    good = _item(engine, recs[FOV1], 500)
    for plan in (p, q):
        x = np.zeros((17, len(plan.unit_ids)), np.float32)
        t = np.arange(17) / 16.0
        bad = WindowItem(plan, x, t, float(t[-1]))
        with pytest.raises(IngestError) as ei:
            engine.run([bad])
        assert ei.value.code == "FAILED_PRECONDITION"
        assert repr(plan.session_id) in ei.value.message
        # one undecodable window in a batch refuses the batch (the caller filters beforehand)
        with pytest.raises(IngestError):
            engine.run([good, bad])


@pytest.mark.parametrize("ids", [[], ["a", "b", "a"], ["c1", "c1"]])
def test_plan_refuses_empty_or_duplicate_unit_ids(engine, ids):
    with pytest.raises(IngestError) as ei:
        engine.plan(FOV1, ids)
    assert ei.value.code == "INVALID_ARGUMENT"
    assert "unit_ids" in ei.value.message


# -- running -------------------------------------------------------------------------------------


def test_run_empty_batch(engine):
    assert engine.run([]) == []


def test_run_refuses_window_of_wrong_width(engine, recs):
    rec = recs[FOV1]
    x, t, e = _window(rec, 400)
    with pytest.raises(IngestError) as ei:
        engine.run([WindowItem(engine.plan(FOV1, rec.unit_ids), x[:, :-1], t, e)])
    assert ei.value.code == "INVALID_ARGUMENT"


def test_run_matches_direct_onnxruntime(engine, recs, service_home, ort_session):
    sim, park = recs["sim512"], recs[FOV4]
    xs, ts, es = _window(sim, 900)
    xp, tp, ep = _window(park, 1234)
    ref = _reference(
        service_home,
        ort_session,
        [("sim512", sim.unit_ids, xs, ts, es), (FOV4, park.unit_ids, xp, tp, ep)],
    )
    got = engine.run(
        [
            WindowItem(engine.plan("sim512", sim.unit_ids), xs, ts, es),
            WindowItem(engine.plan(FOV4, park.unit_ids), xp, tp, ep),
        ]
    )
    assert len(got) == 2
    for i, d in enumerate(got):
        assert d.batch_size == 2 and d.model_ms >= 0
        for t in d.tasks:
            np.testing.assert_allclose(t.logits, ref[f"{t.task}.logits"][i], atol=1e-5, rtol=0)
            np.testing.assert_allclose(
                t.probabilities, ref[f"{t.task}.probs"][i], atol=1e-5, rtol=0
            )
            c = int(np.argmax(ref[f"{t.task}.logits"][i]))
            assert t.predicted_class == c
            # every listed unit is one of the graph's top-M, with its activation and the
            # attribution for the predicted class
            units = ref["units"][i].tolist()
            for u in t.units:
                j = units.index(u.unit)
                assert u.activation == pytest.approx(float(ref["activations"][i, j]), abs=1e-5)
                attr = float(ref[f"{t.task}.attributions"][i, j, c])
                assert u.attribution == pytest.approx(attr, abs=1e-5)
            # and they are the top by |attribution| for that class
            a = np.abs(ref[f"{t.task}.attributions"][i][:, c])
            listed = np.array([units.index(u.unit) for u in t.units])
            assert np.abs(a[listed]).min() >= np.delete(a, listed).max(initial=0.0) - 1e-6


def test_run_probabilities_prediction_and_additivity(engine, recs):
    items = [
        _item(engine, recs["sim512"], 2000),
        _item(engine, recs[FOV5], 3000),
        _item(engine, recs[FOV1], 777, top_m=3),
    ]
    for d in engine.run(items):
        assert [t.task for t in d.tasks] == list(engine.task_names)
        for t in d.tasks:
            assert t.class_names == engine.class_names[t.task]
            assert t.probabilities.shape == t.logits.shape == (len(t.class_names),)
            assert float(t.probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
            assert (t.probabilities >= 0).all()
            e = np.exp(t.logits - t.logits.max())
            np.testing.assert_allclose(t.probabilities, e / e.sum(), atol=1e-5)
            assert t.predicted_class == int(np.argmax(t.logits))
            assert t.predicted_class == int(np.argmax(t.probabilities))
            assert t.predicted_label == t.class_names[t.predicted_class]
            total = sum(u.attribution for u in t.units) + t.unexplained
            assert total == pytest.approx(float(t.logits[t.predicted_class]), abs=1e-4)
            mags = [abs(u.attribution) for u in t.units]
            assert mags == sorted(mags, reverse=True)
            assert len({u.unit for u in t.units}) == len(t.units)
            assert all(0 <= u.unit < engine.n_sae_units for u in t.units)


def test_run_top_m(engine, recs):
    assert engine.top_m == 16  # the M the graph was exported with
    rec = recs["sim512"]
    full, three, one, many = engine.run(
        [
            _item(engine, rec, 1500, top_m=0),
            _item(engine, rec, 1500, top_m=3),
            _item(engine, rec, 1500, top_m=1),
            _item(engine, rec, 1500, top_m=1000),
        ]
    )
    for tf, t3, t1, tm in zip(full.tasks, three.tasks, one.tasks, many.tasks, strict=True):
        assert len(tf.units) == 16 and len(t3.units) == 3 and len(t1.units) == 1
        assert len(tm.units) == 16  # capped at the exported M
        assert [u.unit for u in t3.units] == [u.unit for u in tf.units[:3]]
        assert t1.units[0].unit == tf.units[0].unit
        # fewer units listed: more of the logit is unexplained, the total is the same
        for t in (t3, t1):
            rest = sum(u.attribution for u in tf.units[len(t.units) :])
            assert t.unexplained == pytest.approx(tf.unexplained + rest, abs=1e-4)


def test_missing_frames_are_left_out_not_zero_filled(engine, recs):
    rec = recs["sim512"]
    x, t, e = _window(rec, 2500)
    plan = engine.plan("sim512", rec.unit_ids)
    gap = [4, 5, 6, 17]
    xn = x.copy()
    xn[gap] = np.nan
    tn = t.copy()
    tn[gap[:2]] = np.nan  # missing frames may or may not have a time
    keep = np.ones(len(t), bool)
    keep[gap] = False
    with_nan, removed, zeros, full = engine.run(
        [
            WindowItem(plan, xn, tn, e),
            WindowItem(plan, x[keep], t[keep], e),
            WindowItem(plan, np.nan_to_num(xn), t, e),
            WindowItem(plan, x, t, e),
        ]
    )
    _assert_same(with_nan, removed, tol=1e-5, masked=False)
    assert with_nan.masked_fraction == pytest.approx(len(gap) / len(t))
    assert removed.masked_fraction == 0.0 and full.masked_fraction == 0.0
    # zero-filling (or ignoring the gap) would give another answer
    for other in (zeros, full):
        diff = max(
            float(np.abs(a.logits - b.logits).max())
            for a, b in zip(with_nan.tasks, other.tasks, strict=True)
        )
        assert diff > 1e-4


def test_all_frames_missing_is_fully_masked(engine, recs):
    rec = recs[FOV1]
    x, t, e = _window(rec, 600)
    x[:] = np.nan
    (d,) = engine.run([WindowItem(engine.plan(FOV1, rec.unit_ids), x, t, e)])
    assert d.masked_fraction == 1.0
    for task in d.tasks:
        assert np.isfinite(task.logits).all()
        assert float(task.probabilities.sum()) == pytest.approx(1.0, abs=1e-5)


def test_unknown_cells_are_masked_out(engine, recs):
    rec = recs[FOV5]
    ids = list(rec.unit_ids[:40])
    x, t, e = _window(rec, 4000)
    x = x[:, :40]
    rng = np.random.default_rng(1)
    junk = rng.standard_normal((x.shape[0], 7)).astype(np.float32) * 5
    with_junk = np.concatenate([x[:, :20], junk, x[:, 20:]], axis=1)
    junk_ids = ids[:20] + [f"other/{k}" for k in range(7)] + ids[20:]
    a, b = engine.run(
        [
            WindowItem(engine.plan("live-1", junk_ids), with_junk, t, e),
            WindowItem(engine.plan("live-1", ids), x, t, e),
        ]
    )
    assert a.n_cells_used == b.n_cells_used == 40
    _assert_same(a, b, tol=1e-5)
    # the borrowed embedding is the one of the session the cells came from: same as decoding
    # under the session's own id
    (own,) = engine.run([WindowItem(engine.plan(FOV5, ids), x, t, e)])
    _assert_same(b, own, tol=1e-5)


def test_batch_equals_one_by_one(engine, recs):
    sim, p1, p4 = recs["sim512"], recs[FOV1], recs[FOV4]
    gappy = _item(engine, p4, 3333)
    xg = gappy.values.copy()
    xg[[2, 9]] = np.nan
    gappy = WindowItem(gappy.plan, xg, gappy.frame_times, gappy.end_time, 5)
    items = [
        _item(engine, sim, 1200),
        _item(engine, p1, 800, top_m=2),
        gappy,
        _item(engine, sim, 3000, session_id="sim-live", unit_ids=list(sim.unit_ids[100:250])),
        _item(engine, p4, 5000, n=9),  # a short window (fewer frames than the model window)
        _item(engine, sim, 1200),  # the same window twice in one batch
    ]
    batch = engine.run(items)
    assert len(batch) == len(items)
    for it, d in zip(items, batch, strict=True):
        assert d.batch_size == len(items)
        (alone,) = engine.run([it])
        assert alone.batch_size == 1
        _assert_same(d, alone, tol=1e-4)
    assert batch[3].n_cells_used == 150
    assert [len(t.units) for t in batch[1].tasks] == [2, 2, 2]
    assert [len(t.units) for t in batch[2].tasks] == [5, 5, 5]
    assert batch[2].masked_fraction == pytest.approx(2 / 17)
    _assert_same(batch[0], batch[5], tol=1e-5)


# -- labels, units and model info ----------------------------------------------------------------


def _unit_label(u: int) -> str:
    return f"test-label direction {u * 15 % 360}°" if u % 2 == 0 else ""


def _labelled_units_doc(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    for e in doc["units"]:
        u = int(e["id"])
        labels = []
        if u % 2 == 0:
            labels.append(
                {
                    "variable": "direction",
                    "text": _unit_label(u),
                    "statistic": "osi",
                    "value": 0.5 + u / 1000,
                    "p": 0.001,
                    "q": 0.01,
                    "reproduced_across_seeds": u % 4 == 0,
                }
            )
        if u % 3 == 0:
            labels.append(
                {
                    "variable": "genetic",
                    "text": f"genetic KO u{u}",
                    "statistic": "auroc",
                    "value": 0.8,
                    "p": 0.002,
                    "q": 0.02,
                }  # fmt: skip
            )
        e["labels"] = labels
        e["label"] = _unit_label(u)
    return doc


@pytest.fixture(scope="module")
def labelled(service_home, tmp_path_factory):
    b = service_home.bundle
    doc = _labelled_units_doc(b.read_json("units.json"))
    src = b.source_files()
    src["units.json"] = (json.dumps(doc, indent=1) + "\n").encode()
    out = tmp_path_factory.mktemp("labelled") / "bundle"
    nb = write_bundle(
        src,
        out,
        name=b.name,
        version=b.version,
        parent=b.parent,
        provenance=b.provenance,
        required=b.manifest.required,
    )
    return Engine(nb)


def test_labels_come_from_units_json(engine, labelled, recs):
    assert labelled.ref.version == engine.ref.version
    assert labelled.ref.label_set != engine.ref.label_set
    sha = hashlib.sha256((labelled.bundle.path / "units.json").read_bytes()).hexdigest()
    assert labelled.ref.label_set.endswith(sha[:12])
    items = [_item(labelled, recs["sim512"], 1800), _item(labelled, recs[FOV5], 2222)]
    seen = 0
    for d, plain in zip(labelled.run(items), engine.run(items), strict=True):
        for t, tp in zip(d.tasks, plain.tasks, strict=True):
            np.testing.assert_allclose(t.logits, tp.logits, atol=1e-6)  # same graph
            for u in t.units:
                assert u.label == _unit_label(u.unit)
                seen += bool(u.label)
            assert all(u.label == "" for u in tp.units)  # the quick bundle has no labels
    assert seen > 0


def test_units_listing_and_variable_filter(engine, labelled, service_home):
    n = engine.n_sae_units
    assert n == service_home.bundle.read_json("config.json")["sae"]["n_units"] == 128
    everything = engine.units()
    assert [u["unit"] for u in everything] == list(range(n))
    assert all(u["labels"] == [] for u in everything)
    doc = service_home.bundle.read_json("units.json")
    rates = {int(e["id"]): e["firing_rate"] for e in doc["units"]}
    assert [u["firing_rate"] for u in everything] == [rates[u] for u in range(n)]
    assert engine.units("direction") == []

    assert len(labelled.units()) == n
    direction = labelled.units("direction")
    assert [u["unit"] for u in direction] == list(range(0, n, 2))
    genetic = labelled.units("genetic")
    assert [u["unit"] for u in genetic] == list(range(0, n, 3))
    assert labelled.units("temporal_frequency") == []
    u6 = next(u for u in direction if u["unit"] == 6)
    assert [lab["variable"] for lab in u6["labels"]] == ["direction", "genetic"]
    d6 = u6["labels"][0]
    assert d6 == {
        "variable": "direction",
        "text": _unit_label(6),
        "statistic_name": "osi",
        "statistic": pytest.approx(0.506),
        "p_value": pytest.approx(0.001),
        "q_value": pytest.approx(0.01),
        "reproduced_across_seeds": False,
    }
    assert next(u for u in direction if u["unit"] == 4)["labels"][0]["reproduced_across_seeds"]
    g3 = next(u for u in genetic if u["unit"] == 3)["labels"]
    assert len(g3) == 1 and g3[0]["statistic_name"] == "auroc"
    assert g3[0]["reproduced_across_seeds"] is False  # absent -> False
    # the listing converts to the wire message
    msg = wire.units_pb(labelled.ref, direction)
    assert [u.unit for u in msg.units] == list(range(0, n, 2))


def test_model_info(engine, service_home):
    b = service_home.bundle
    info = engine.model_info()
    assert info["ref"] == engine.ref
    assert info["parent_version"] == (b.parent or "")
    assert info["tasks"] == [(t, engine.class_names[t]) for t in engine.task_names]
    assert info["n_sae_units"] == 128
    assert info["attribution_method"] == "ablation"
    assert info["tokenizer"] == b.read_json("config.json")["checkpoint"]["decoder"]["tokenizer"]
    assert info["window_s"] == 1.0
    assert info["default_top_m"] == 16
    manifest = json.loads(info["manifest_json"])
    assert manifest["name"] == "default" and manifest["version"] == "v0001"
    assert set(manifest["files"]) == set(b.files)
    assert json.loads(info["metrics_json"]) == b.read_json("metrics.json")
    assert info["sessions"] == b.read_json("vocab.json")["session_ids"]
    assert "sim512" in info["sessions"] and FOV1 in info["sessions"]
    msg = wire.model_info_pb(info)
    assert msg.model.version == "v0001" and msg.default_top_m == 16
    assert [t.name for t in msg.tasks] == list(engine.task_names)


# -- fixed-shape graphs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_engine(service_home, tmp_path_factory):
    """The quick bundle plus a fixed-shape graph of 4 windows x 160 tokens (exported here from
    the bundle's own weights, as `cortexlens export --fixed-shape 4x160` does), served through it
    (``fixed_shapes=True``) and through I/O binding for everything else."""
    from models.decoder.from_bundle import checkpoint_from_bundle, sae_from_bundle
    from models.export import ExplainedDecoder, export_onnx, fixed_model_file

    b = service_home.bundle
    cfg = b.read_json("config.json")
    model = ExplainedDecoder(
        checkpoint_from_bundle(b).model, sae_from_bundle(b), int(cfg["export"]["top_m"])
    ).eval()
    root = tmp_path_factory.mktemp("fixed")
    fname = fixed_model_file(4, 160)
    export_onnx(model, root / fname, fixed=(4, 160))
    cfg["export"]["fixed_shapes"] = [{"batch": 4, "tokens": 160, "file": fname}]
    src = b.source_files() | {fname: root / fname, "config.json": json.dumps(cfg).encode()}
    nb = write_bundle(
        src, root / "bundle", name=b.name, version=b.version, provenance=b.provenance,
        required=b.manifest.required,
    )  # fmt: skip
    return Engine(nb, fixed_shapes=True, io_binding=True)


def test_fixed_shape_graph_serves_the_batches_it_holds_with_the_same_results(
    engine, fixed_engine, recs
):
    from models.runtime import FixedShapeRunner

    assert engine.fixed == [] and not engine.runner.io_binding  # CPU defaults: neither
    (fixed,) = fixed_engine.fixed
    assert isinstance(fixed, FixedShapeRunner) and (fixed.batch, fixed.tokens) == (4, 160)
    assert fixed_engine.runner.io_binding
    calls = []
    run = fixed.run
    fixed.run = lambda feeds: calls.append(feeds["mask"].shape) or run(feeds)
    try:
        sim, p1, p5 = recs["sim512"], recs[FOV1], recs[FOV5]
        small = [_item(engine, p1, 800), _item(engine, p5, 1500, top_m=3)]
        part = _item(engine, sim, 3000, session_id="sim-live", unit_ids=list(sim.unit_ids[:150]))
        wide = _item(engine, sim, 1200)  # 512 cells: more tokens than the fixed graph holds
        cases = [small, [small[0]], small + [part], [wide], small * 3]
        for items in cases:
            items_f = [
                WindowItem(
                    fixed_engine.plan(i.plan.session_id, i.plan.unit_ids),
                    i.values,
                    i.frame_times,
                    i.end_time,
                    i.top_m,
                )
                for i in items
            ]
            for a, b in zip(fixed_engine.run(items_f), engine.run(items), strict=True):
                _assert_same(a, b, tol=1e-4)
    finally:
        fixed.run = run
    # through the fixed graph: the three batches of <= 4 windows of <= 160 cells, not the
    # 512-cell window nor the batch of 6
    assert calls == [(2, 74), (1, 28), (3, 150)]
