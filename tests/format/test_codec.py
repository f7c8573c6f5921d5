"""The JSON codec for non-tensor checkpoint state: round trips, unsupported values, hostile documents."""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ckpt import CheckpointCorruptError
from lightning_ckpt.format.codec import decode, encode, warn_unsupported


def roundtrip(obj, on_unsupported=None):
    """encode -> strict JSON text -> decode, the way the writer and loader do it."""
    doc, tensors = encode(obj, on_unsupported=on_unsupported)
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)  # must be strict JSON
    tensors = {k: v.clone() for k, v in tensors.items()}
    return decode(json.loads(text), lambda key: tensors[key])


def assert_same(a, b, path="root"):
    """Deep equality that also checks types, NaN, tensors and numpy values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)} is not a tensor"
        assert b.dtype == a.dtype and b.shape == a.shape, f"{path}: {b.dtype}{list(b.shape)} vs {a.dtype}{list(a.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), path
        return
    if isinstance(a, np.ndarray):
        assert type(b) is np.ndarray, f"{path}: {type(b)}"
        assert b.dtype == a.dtype and b.shape == a.shape, f"{path}: {b.dtype}{b.shape} vs {a.dtype}{a.shape}"
        np.testing.assert_array_equal(a, b, err_msg=path)
        return
    assert type(b) is type(a), f"{path}: type {type(b).__name__} != {type(a).__name__} ({b!r} vs {a!r})"
    if isinstance(a, float) or isinstance(a, np.floating):
        assert (math.isnan(a) and math.isnan(b)) or a == b, f"{path}: {b!r} != {a!r}"
        return
    if isinstance(a, dict):
        assert list(b.keys()) == list(a.keys()), f"{path}: keys {list(b)} != {list(a)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(b)} != {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
        return
    if isinstance(a, argparse.Namespace):
        assert_same(vars(a), vars(b), f"{path}.__dict__")
        return
    assert a == b, f"{path}: {b!r} != {a!r}"


def lightning_like_checkpoint() -> dict:
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    return {
        "epoch": 2,
        "global_step": 40,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {"net.0.weight": w, "net.0.bias": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(7)},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(40.0), "exp_avg": torch.randn(3, 4), "exp_avg_sq": torch.rand(3, 4)}, 1: {}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                  "amsgrad": False, "params": [0, 1], "maximize": False, "foreach": None}],
            }
        ],
        "lr_schedulers": [{"step_size": 5, "gamma": 0.9, "base_lrs": [0.01], "last_epoch": 40, "_last_lr": [0.0059]}],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 2}},
                               "epoch_loop.batch_progress": {"is_last_batch": False}}},
        "callbacks": {"EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {"wait_count": 0, "best_score": torch.tensor(float("inf"))}},
        "hyper_parameters": argparse.Namespace(lr=0.01, layers=2, data_dir=pathlib.Path("/data/x"), tags={"a", "b"}),
        "hparams_name": "kwargs",
        "metrics": {"val_loss": float("nan"), "best": float("inf"), "worst": float("-inf"), "zero": -0.0},
        "blob": b"\x00\xff binary \x80",
        "dtype": torch.bfloat16,
        "shape": torch.Size([2, 3, 0]),
        "ckpt_dir": pathlib.Path("/tmp/run") / "ckpts",
        "seen": {1, 2, 3},
        "seen_pairs": {(1, "a"), (2, "b")},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "np_array": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],  # non-contiguous
        "np_float_array": np.linspace(0, 1, 5, dtype=np.float16),
        "np_bool_array": np.array([True, False]),
        "np_int": np.int64(-5),
        "np_f32": np.float32(1.5),
        "np_bool": np.bool_(True),
        "np_f64": np.float64(2.25),
        "tuple_keys": {(0, 1): "pair", 3: "int", None: "none"},
        "dollar_keys": {"$t": "not a tensor ref", "$weird": 1},
        "unicode": "héllo ✓ \u2028",
        "empty": {"list": [], "dict": {}, "tuple": ()},
        "big_int": 2**70,
    }


def test_lightning_like_checkpoint_round_trips_exactly():
    ckpt = lightning_like_checkpoint()
    out = roundtrip(ckpt)
    assert list(out) == list(ckpt)
    problems = []
    for key in ckpt:  # report every value that does not come back, not just the first
        try:
            assert_same(ckpt[key], out[key], key)
        except AssertionError as e:
            problems.append(str(e).splitlines()[0])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "value",
    [
        torch.Size([2, 3]),
        torch.Size([]),
        np.int64(-5),
        np.uint8(200),
        np.float32(1.5),
        np.float64(2.25),
        np.float64("nan"),
        np.bool_(False),
        (1, (2, 3), []),
        {1: "a", 2: {3: "b"}},
        float("nan"),
        float("-inf"),
        b"",
        bytearray(b"abc"),
        torch.float8_e4m3fn,
        torch.int64,
        torch.device("cpu"),
        pathlib.Path("relative/dir"),
        {"x": argparse.Namespace(a=1, b=[1, 2])},
        {1, 2, (3, "x")},
    ],
    ids=repr,
)
def test_single_values_keep_value_and_type(value):
    out = roundtrip({"v": value})["v"]
    expected = bytes(value) if isinstance(value, bytearray) else value
    assert_same(expected, out)


def test_python_rng_state_restores_the_generator():
    random.seed(1234)
    random.random()
    state = random.getstate()
    expected = [random.random() for _ in range(5)]
    out = roundtrip({"python": state})["python"]
    assert out == state
    random.setstate(out)
    assert [random.random() for _ in range(5)] == expected


def test_numpy_rng_state_restores_the_generator():
    np.random.seed(99)
    np.random.rand()
    state = np.random.get_state()
    expected = np.random.rand(5)
    out = roundtrip({"numpy": state})["numpy"]
    assert isinstance(out, tuple) and out[0] == "MT19937"
    assert out[1].dtype == state[1].dtype and np.array_equal(out[1], state[1])
    np.random.seed(0)  # scramble, then restore
    np.random.set_state(out)
    np.testing.assert_array_equal(np.random.rand(5), expected)


def test_tensors_are_extracted_not_serialized_into_json():
    t = torch.arange(6.0).reshape(2, 3)
    doc, tensors = encode({"state_dict": {"a.weight": t}, "opt": {0: {"m": t * 2}}})
    text = json.dumps(doc)
    assert "5.0" not in text and len(text) < 200
    assert len(tensors) == 2
    assert any(torch.equal(v, t) for v in tensors.values())


def test_keys_with_slashes_and_tildes_do_not_collide():
    obj = {"a/b": torch.tensor([1]), "a": {"b": torch.tensor([2])}, "a~1b": torch.tensor([3]), "~": torch.tensor([4])}
    doc, tensors = encode(obj)
    assert len(tensors) == 4
    assert_same(obj, roundtrip(obj))


@pytest.mark.parametrize(
    "obj",
    [
        {0: torch.tensor([1.0]), "0": torch.tensor([2.0])},
        {(1, 2): torch.tensor([1]), "(1, 2)": torch.tensor([2])},
        {"state": {None: torch.tensor([1]), "None": torch.tensor([2])}},
    ],
    ids=["int-vs-str", "tuple-vs-str", "none-vs-str"],
)
def test_keys_of_different_types_with_the_same_str_keep_their_own_tensors(obj):
    assert_same(obj, roundtrip(obj))


def test_unsupported_object_becomes_repr_string_with_warning():
    class Opaque:
        def __repr__(self):
            return "Opaque(secret=1)"

    obj = {"cb": {"thing": Opaque()}, "ok": 1}
    with pytest.warns(UserWarning) as rec:
        out = roundtrip(obj, on_unsupported=warn_unsupported)
    msg = " ".join(str(w.message) for w in rec)
    assert "cb/thing" in msg and "Opaque" in msg and "string" in msg
    assert out == {"cb": {"thing": "Opaque(secret=1)"}, "ok": 1}


def test_unsupported_object_repr_is_bounded():
    class Huge:
        def __repr__(self):
            return "x" * 100_000

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc, _ = encode({"h": Huge()}, on_unsupported=warn_unsupported)
    assert len(json.dumps(doc)) < 5000


def test_supported_values_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roundtrip(lightning_like_checkpoint(), on_unsupported=warn_unsupported)


def _no_tensors(key):
    raise KeyError(key)


@pytest.mark.parametrize(
    "doc",
    [
        {"$evil": 1},
        {"$__reduce__": ["os", "system"]},
        {"a": [{"$unknown": None}]},
        {"$float": "1e999"},
        {"$float": 3},
        {"$tuple": 5},
        {"$dict": 7},
        {"$dict": [[1]]},
        {"$set": [{"a": 1}]},
        {"$bytes": "%%%not base64%%%"},
        {"$bytes": 12},
        {"$dtype": "not_a_dtype"},
        {"$dtype": "nn"},
        {"$dtype": "save"},
        {"$size": ["x"]},
        {"$size": 3},
        {"$device": "nonsense_device"},
        {"$device": 42},
        {"$path": 5},
        {"$namespace": [1, 2]},
        {"$npscalar": ["not_a_dtype", 1]},
        {"$npscalar": 3},
        {"$enum": 5},
        {"$repr": 5},
        {"$t": "no such tensor"},
        {"$np": "no such tensor"},
        {"$t": ["unhashable"]},
    ],
    ids=lambda d: json.dumps(d),
)
def test_decode_rejects_malformed_documents(doc):
    with pytest.raises(CheckpointCorruptError) as ei:
        decode(doc, _no_tensors)
    assert "corrupt" in str(ei.value)


def test_decode_names_the_unknown_tag():
    with pytest.raises(CheckpointCorruptError, match=r"\$evil"):
        decode({"x": {"$evil": [1, 2]}}, _no_tensors)


def test_decode_never_imports_or_calls_by_name():
    out = decode({"a": {"$type": "os.system"}, "b": {"$repr": ["subprocess.Popen", "Popen(['rm'])"]},
                  "c": {"$enum": ["os.EX_OK", 0]}}, _no_tensors)
    assert out == {"a": "os.system", "b": "Popen(['rm'])", "c": 0}


def test_type_values_are_not_resolved_beyond_an_allow_list():
    doc, _ = encode({"t": dict, "u": pathlib.Path})
    out = decode(json.loads(json.dumps(doc)), _no_tensors)
    assert out["t"] is dict
    assert out["u"] == "pathlib.Path"


# ---------------------------------------------------------------- property test
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_hashables = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=6) | st.binary(max_size=4),
    lambda inner: st.tuples(inner, inner),
    max_leaves=4,
)
_tensors = st.builds(
    lambda n, dt: (torch.arange(n) % 7).to(dt),
    st.integers(0, 4),
    st.sampled_from([torch.float32, torch.int64, torch.bool, torch.bfloat16]),
)
# keys whose str() coincide (0 and "0", (0, 1) and "(0, 1)") must still keep their own values
_keys = (
    st.sampled_from([0, 1, -1, "0", "1", "-1", "a", "a/b", "$t", "~", (0, 1), "(0, 1)", None, "None"])
    | st.text(max_size=4)
    | st.integers(-5, 5)
    | st.tuples(st.integers(0, 3), st.integers(0, 3))
)
_nested = st.recursive(
    _scalars | _tensors,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        | st.dictionaries(_keys, inner, max_size=4)
        | st.sets(_hashables, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_nested)
def test_property_nested_structures_round_trip(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in this strategy is unsupported
        out = roundtrip({"root": obj}, on_unsupported=warn_unsupported)
    assert_same({"root": obj}, out)
