"""lvb.runtime.sail without a device.

sophon.sail is replaced by a small in-memory stand-in for the SDK that has
only the calls SailEngine uses, with the signatures of sophon-sail's Python
docs (docs/source_en/module_python/sail.Engine.rst, sail.Tensor.rst,
sail.Handle.rst, 0_enum_type/sail.IOMode.rst, sail.Dtype.rst). It keeps
system and device memory apart, so a missing sync shows, starts device memory
as garbage, and exits like the SDK on a bad sync_d2d. SailEngine itself is
the real one; its results are checked against HostBuffers, the resident
buffers of the host backends, running the same graphs.
"""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from lvb.contract import TensorInfo
from lvb.runtime.engine import EngineError, HostBuffers, Resident

# -- the stand-in SDK ----------------------------------------------------------


class Dtype(enum.Enum):  # sail.Dtype.rst (the 16-bit members: docs/source_zh)
    BM_FLOAT32 = 0
    BM_FLOAT16 = 1
    BM_INT8 = 2
    BM_UINT8 = 3
    BM_INT16 = 4
    BM_UINT16 = 5
    BM_INT32 = 6
    BM_UINT32 = 7
    BM_BFLOAT16 = 8


class IOMode(enum.Enum):  # sail.IOMode.rst
    SYSI = 0
    SYSO = 1
    SYSIO = 2
    DEVIO = 3


_RAW = {Dtype.BM_FLOAT32: np.float32, Dtype.BM_FLOAT16: np.float16, Dtype.BM_BFLOAT16: np.uint16,
        Dtype.BM_INT32: np.int32, Dtype.BM_UINT32: np.uint32, Dtype.BM_INT16: np.int16,
        Dtype.BM_UINT16: np.uint16, Dtype.BM_INT8: np.int8, Dtype.BM_UINT8: np.uint8}
# update_data wants the tensor's dtype, float16 as a uint16 view (sail.Tensor.rst); bf16 is uint16 bits.
_UPDATE = {**_RAW, Dtype.BM_FLOAT16: np.uint16}
TRAFFIC: list[str] = []  # "s2d", "d2s", "d2d": every copy the stand-in device makes


class Handle:  # sail.Handle.rst
    def __init__(self, tpu_id: int):
        self._tpu_id = tpu_id

    def get_device_id(self) -> int:
        return self._tpu_id


class Tensor:  # sail.Tensor.rst
    def __init__(self, handle: Handle, shape: list[int], dtype: Dtype, own_sys_data: bool, own_dev_data: bool):
        assert isinstance(handle, Handle) and isinstance(dtype, Dtype)
        self._shape, self._dtype = list(shape), dtype
        raw = np.dtype(_RAW[dtype])
        garbage = np.full(int(np.prod(shape)) * raw.itemsize, 0xAB, np.uint8).view(raw)  # memory starts dirty
        self._sys = garbage.copy().reshape(shape) if own_sys_data else None
        self._dev = garbage.copy().reshape(shape) if own_dev_data else None

    def shape(self) -> list:
        return list(self._shape)

    def dtype(self) -> Dtype:
        return self._dtype

    def asnumpy(self) -> np.ndarray:
        # Documented for float32/int8/uint8; for 16-bit floats the SDK hands back the bits as uint16.
        data = self._sys if self._sys is not None else self._dev
        return data.copy().view(np.uint16) if self._dtype in (Dtype.BM_FLOAT16, Dtype.BM_BFLOAT16) else data.copy()

    def update_data(self, data: np.ndarray) -> None:
        if data.dtype != _UPDATE[self._dtype]:
            raise TypeError(f"update_data: {data.dtype} data for a {self._dtype.name} tensor")
        target = self._sys if self._sys is not None else self._dev
        if data.size > target.size:
            raise ValueError("update_data: data larger than the tensor")
        target.reshape(-1)[: data.size] = data.reshape(-1).view(target.dtype)

    def sync_s2d(self) -> None:
        TRAFFIC.append("s2d")
        self._dev[...] = self._sys

    def sync_d2s(self) -> None:
        TRAFFIC.append("d2s")
        self._sys[...] = self._dev

    def sync_d2d(self, src: Tensor, offset_src: int, offset_dst: int, len: int) -> None:  # noqa: A002 (the doc's name)
        # Offsets and length count elements. The SDK calls exit() on a dtype or bounds error.
        if self._dtype != src._dtype or offset_src + len > src._dev.size or offset_dst + len > self._dev.size:
            raise SystemExit("sync_d2d: dtypes differ or out of bounds")
        TRAFFIC.append("d2d")
        self._dev.reshape(-1)[offset_dst : offset_dst + len] = src._dev.reshape(-1)[offset_src : offset_src + len]

    def zeros(self) -> None:
        for data in (self._sys, self._dev):
            if data is not None:
                data[...] = 0


@dataclass
class Graph:
    inputs: list[tuple[str, tuple[int, ...], Dtype]]
    outputs: list[tuple[str, tuple[int, ...], Dtype]]
    fn: Callable[..., list[np.ndarray]]  # host arrays (floats as float32) in, in input order


def _device_to_host(raw: np.ndarray, dtype: Dtype) -> np.ndarray:
    if dtype == Dtype.BM_BFLOAT16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32) if dtype == Dtype.BM_FLOAT16 else raw.copy()


def _host_to_device(x: np.ndarray, dtype: Dtype) -> np.ndarray:
    if dtype == Dtype.BM_BFLOAT16:
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
        assert not (bits & 0xFFFF).any(), "test graphs keep bf16 values exact"
        return (bits >> 16).astype(np.uint16)
    return np.asarray(x).astype(_RAW[dtype])


BMODELS: dict[str, dict[str, Graph]] = {}


class Engine:  # sail.Engine.rst
    def __init__(self, bmodel_path: str, tpu_id: int, mode: IOMode):
        if bmodel_path not in BMODELS:
            raise RuntimeError(f"bmodel {bmodel_path} is not valid")
        self._graphs, self._handle, self._mode = BMODELS[bmodel_path], Handle(tpu_id), mode

    def get_handle(self) -> Handle:
        return self._handle

    def get_graph_names(self) -> list:
        return list(self._graphs)

    def get_input_names(self, graph_name: str) -> list:
        return [name for name, _, _ in self._graphs[graph_name].inputs]

    def get_output_names(self, graph_name: str) -> list:
        return [name for name, _, _ in self._graphs[graph_name].outputs]

    def _tensor(self, graph_name: str, side: str, tensor_name: str):
        return next(t for t in getattr(self._graphs[graph_name], side) if t[0] == tensor_name)

    def get_input_shape(self, graph_name: str, tensor_name: str) -> list:
        return list(self._tensor(graph_name, "inputs", tensor_name)[1])

    def get_output_shape(self, graph_name: str, tensor_name: str) -> list:
        return list(self._tensor(graph_name, "outputs", tensor_name)[1])

    def get_input_dtype(self, graph_name: str, tensor_name: str) -> Dtype:
        return self._tensor(graph_name, "inputs", tensor_name)[2]

    def get_output_dtype(self, graph_name: str, tensor_name: str) -> Dtype:
        return self._tensor(graph_name, "outputs", tensor_name)[2]

    def process(self, graph_name: str, input_tensors: dict, output_tensors: dict, core_list: list | None = None) -> None:
        # The tensor-map overload; the doc's sample calls it without core_list.
        assert self._mode == IOMode.DEVIO, "this stand-in runs device-side I/O only"
        graph = self._graphs[graph_name]
        for tensors, specs in ((input_tensors, graph.inputs), (output_tensors, graph.outputs)):
            assert set(tensors) == {name for name, _, _ in specs}, (graph_name, set(tensors))
            for name, shape, dtype in specs:
                assert tensors[name].shape() == list(shape) and tensors[name].dtype() == dtype, (graph_name, name)
        args = [_device_to_host(input_tensors[name]._dev, dtype) for name, _, dtype in graph.inputs]
        for (name, shape, dtype), value in zip(graph.outputs, graph.fn(*args), strict=True):
            output_tensors[name]._dev[...] = _host_to_device(np.asarray(value).reshape(shape), dtype)


# -- the graphs and their reference --------------------------------------------

F32, BF16, F16, I32 = Dtype.BM_FLOAT32, Dtype.BM_BFLOAT16, Dtype.BM_FLOAT16, Dtype.BM_INT32
SCALE = np.array([1, 2, 4], np.float32)


def _broken(x):
    raise RuntimeError("bmrt_launch_tensor failed")


GRAPHS = {
    "embed": Graph([("ids", (1, 4), I32)], [("out", (1, 4, 3), F32)], lambda ids: [ids[..., None] * SCALE]),
    "add": Graph([("x", (1, 4, 3), F32)], [("y", (1, 4, 3), F32)], lambda x: [x + 1]),
    "block": Graph(
        [("hidden", (1, 4, 3), F32), ("past_k", (1, 8, 3), F32)],
        [("hidden_out", (1, 4, 3), F32), ("k", (1, 4, 3), F32)],
        lambda h, k: [h + k.sum(axis=1, keepdims=True), h * 2],
    ),
    "concat": Graph(
        [("a", (1, 2, 3), F32), ("b", (1, 4, 3), F32)], [("c", (1, 6, 3), F32)],
        lambda a, b: [np.concatenate([a, b], axis=1)],
    ),
    "head": Graph([("h", (1, 1, 3), F32)], [("logits", (1, 3), F32)], lambda h: [h[0] * 10 - 1]),
    "cross": Graph(
        [("states", (1, 4, 3), F32)], [("ck", (1, 8, 3), F32), ("cv", (1, 8, 3), F32)],
        lambda s: [np.concatenate([s, s + 1], axis=1), np.concatenate([s - 1, s], axis=1)],
    ),
    "bf16_block": Graph(
        [("hidden", (1, 4, 3), BF16), ("past", (1, 8, 3), BF16)],
        [("hidden_out", (1, 4, 3), BF16), ("k", (1, 4, 3), BF16)],
        lambda h, k: [h + 1, h / 2 + k[:, :4]],
    ),
    "bf16_identity": Graph([("x", (1, 6), BF16)], [("y", (1, 6), BF16)], lambda x: [x]),
    "f16_add": Graph([("x", (1, 4, 3), F16)], [("y", (1, 4, 3), F16)], lambda x: [x + 0.5]),
    "broken": Graph([("x", (1, 3), F32)], [("y", (1, 3), F32)], _broken),
}


class Reference:
    """The same graphs on HostBuffers, as the onnxruntime engine runs its nets."""

    def __init__(self, graphs: dict[str, Graph]):
        self.graphs, self.buffers = graphs, HostBuffers()

    def allocate(self, buffer, shape, dtype="float32"):
        self.buffers.allocate(buffer, shape, dtype)

    def read(self, buffer):
        return self.buffers.read(buffer)

    def run(self, net, feeds, store=None):
        graph = self.graphs[net]
        host = {F32: np.float32, BF16: np.float32, F16: np.float32, I32: np.int32}
        args = [np.ascontiguousarray(self.buffers.resolve(feeds[name]), host[dtype])
                for name, _, dtype in graph.inputs]
        result = []
        for index, output in enumerate(graph.fn(*args)):
            output = np.asarray(output, np.float32)
            target = (store or {}).get(index)
            if target is None:
                result.append(output)
            else:
                self.buffers.store(output, target)
                result.append(None)
        return result


@pytest.fixture
def sail(monkeypatch, tmp_path):
    module = types.ModuleType("sophon.sail")
    module.Dtype, module.IOMode, module.Handle, module.Tensor, module.Engine = Dtype, IOMode, Handle, Tensor, Engine
    package = types.ModuleType("sophon")
    package.sail = module
    monkeypatch.setitem(sys.modules, "sophon", package)
    monkeypatch.setitem(sys.modules, "sophon.sail", module)
    bmodel = tmp_path / "model.bmodel"
    bmodel.write_bytes(b"stand-in")
    monkeypatch.setitem(BMODELS, str(bmodel), GRAPHS)
    TRAFFIC.clear()
    return bmodel


@pytest.fixture
def engine(sail):
    from lvb.runtime.sail import SailEngine

    with SailEngine(sail) as engine:
        yield engine


# -- tests ---------------------------------------------------------------------


def test_without_sophon_sail_the_error_is_one_line(monkeypatch, tmp_path):
    from lvb.runtime.sail import SailEngine

    monkeypatch.setitem(sys.modules, "sophon", None)  # as on a machine without Sophgo's SDK
    with pytest.raises(EngineError) as caught:
        SailEngine(tmp_path / "model.bmodel")
    assert str(caught.value) == (
        "the sail backend needs sophon.sail (Sophgo's SDK on the device); use --backend cmodel or onnxruntime here"
    )


def test_nets_list_every_graph_in_numpy_terms(engine):
    assert set(engine.nets) == set(GRAPHS)
    block = engine.nets["bf16_block"]
    assert block.inputs == (TensorInfo("hidden", (1, 4, 3), "float32"), TensorInfo("past", (1, 8, 3), "float32"))
    assert [t.name for t in block.outputs] == ["hidden_out", "k"]
    assert engine.nets["embed"].inputs == (TensorInfo("ids", (1, 4), "int32"),)


def _scenario():
    """A conversation's worth of calls: (method, args) pairs."""
    hidden, k = Resident("hidden"), Resident("k")
    ids = np.array([[3, 1, 4, 1]], np.int32)
    return [
        ("allocate", ("hidden", (1, 4, 3))),
        ("allocate", ("k", (1, 8, 3))),
        ("allocate", ("kb", (1, 8, 3))),
        ("allocate", ("hidden1", (1, 1, 3))),
        ("allocate", ("ck", (1, 8, 3))),
        ("allocate", ("cv", (1, 8, 3))),
        ("allocate", ("ids", (1, 4), "int32")),
        ("run", ("embed", {"ids": ids}, {0: hidden})),
        ("run", ("add", {"x": hidden}, {0: hidden})),  # reads and writes the same buffer
        ("run", ("block", {"hidden": hidden, "past_k": k}, {0: hidden, 1: Resident("k", 0, 4)})),
        ("run", ("block", {"hidden": hidden, "past_k": k}, {0: hidden, 1: Resident("k", 4, 2)})),
        ("run", ("block", {"hidden": hidden, "past_k": k}, {1: Resident("k", 6, 2)})),  # hidden comes back
        ("run", ("head", {"h": Resident("hidden", 3, 1)}, {0: Resident("hidden1")})),  # (1, 3) into (1, 1, 3)
        ("run", ("head", {"h": Resident("hidden", 2, 1)}, None)),
        ("run", ("head", {"h": np.full((1, 1, 3), 0.5, np.float32)}, None)),
        ("run", ("concat", {"a": Resident("hidden", 1, 2), "b": hidden}, None)),
        ("run", ("concat", {"a": Resident("k", 6), "b": Resident("k", 2, 4)}, {0: Resident("cv", 1, 6)})),
        ("run", ("cross", {"states": hidden}, {0: Resident("ck"), 1: Resident("cv")})),  # outputs in place
        ("run", ("cross", {"states": hidden}, {1: Resident("cv", 2, 3)})),
        # A bf16 net on float32 buffers: converted on the way in and out.
        ("run", ("bf16_block", {"hidden": hidden, "past": k}, {0: hidden, 1: Resident("kb", 2, 4)})),
        ("run", ("bf16_block", {"hidden": np.arange(12, dtype=np.float32).reshape(1, 4, 3) / 4, "past": k}, None)),
        ("run", ("f16_add", {"x": hidden}, None)),
        ("run", ("embed", {"ids": Resident("ids")}, {0: hidden})),  # an int32 buffer fed whole
        ("allocate", ("k", (1, 8, 3))),  # again: back to zeros
        ("run", ("block", {"hidden": hidden, "past_k": k}, None)),
    ]


def test_same_results_as_host_buffers(engine):
    reference = Reference(GRAPHS)
    buffers: set[str] = set()
    for step, (method, args) in enumerate(_scenario()):
        got, want = getattr(engine, method)(*args), getattr(reference, method)(*args)
        if method == "allocate":
            buffers.add(args[0])
        else:
            assert len(got) == len(want), step
            for g, w in zip(got, want, strict=True):
                if w is None:
                    assert g is None, step
                else:
                    assert g.dtype == w.dtype and g.shape == w.shape, step
                    np.testing.assert_array_equal(g, w, err_msg=f"step {step} {args[0]}")
        for name in buffers:
            got_buffer, want_buffer = engine.read(name), reference.read(name)
            assert got_buffer.dtype == want_buffer.dtype, (step, name)
            np.testing.assert_array_equal(got_buffer, want_buffer, err_msg=f"step {step} {args[0]}: buffer {name}")


def test_resident_runs_stay_on_the_device(engine):
    for name, shape in (("hidden", (1, 4, 3)), ("k", (1, 8, 3)), ("ck", (1, 8, 3)), ("cv", (1, 8, 3))):
        engine.allocate(name, shape)
    engine.run("embed", {"ids": np.array([[1, 2, 3, 4]], np.int32)}, store={0: Resident("hidden")})

    TRAFFIC.clear()
    engine.run("block", {"hidden": Resident("hidden"), "past_k": Resident("k")},
               store={0: Resident("hidden"), 1: Resident("k", 2, 1)})
    # past_k is bound as it is; the hidden state (an input too) and the new K row are copied in.
    assert TRAFFIC == ["d2d", "d2d"]

    TRAFFIC.clear()
    engine.run("cross", {"states": Resident("hidden")}, store={0: Resident("ck"), 1: Resident("cv")})
    assert TRAFFIC == []  # the input is bound, the outputs are written in place

    TRAFFIC.clear()
    engine.run("head", {"h": Resident("hidden", 1, 1)})
    assert TRAFFIC == ["d2d", "d2s"]  # the row in, the logits out


def test_bf16_rounds_to_nearest_even(engine):
    one = np.float32(1.0)
    x = np.array([[1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 3.0, -0.0]], np.float32)
    (y,) = engine.run("bf16_identity", {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[one, 1 + 2**-6, -one, 1 + 2**-7, 3.0, -0.0]])


def test_float16_buffers_and_unsupported_dtypes(engine):
    engine.allocate("half", (1, 2), "float16")
    assert engine.read("half").dtype == np.float16
    with pytest.raises(EngineError, match="buffer wide: sail cannot hold float64"):
        engine.allocate("wide", (1, 2), "float64")


def test_errors_name_the_net(engine):
    engine.allocate("hidden", (1, 4, 3))
    engine.allocate("small", (1, 2, 3))
    with pytest.raises(EngineError, match="no net 'nope'"):
        engine.run("nope", {})
    with pytest.raises(EngineError, match="net add: no feed for input x"):
        engine.run("add", {})
    with pytest.raises(EngineError, match=r"net add: input x is \[1, 4, 3\], got an array of \[2, 3\]"):
        engine.run("add", {"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(EngineError, match="net add: no resident buffer 'missing'"):
        engine.run("add", {"x": Resident("missing")})
    with pytest.raises(EngineError, match="net broken: bmrt_launch_tensor failed"):
        engine.run("broken", {"x": np.zeros((1, 3), np.float32)})
    # Out of bounds is an error, not the SDK's exit().
    with pytest.raises(EngineError, match="net add"):
        engine.run("add", {"x": Resident("hidden")}, store={0: Resident("hidden", 2)})
    with pytest.raises(EngineError, match="net add"):
        engine.run("add", {"x": Resident("hidden")}, store={0: Resident("small")})
    with pytest.raises(EngineError, match="net head"):
        engine.run("head", {"h": Resident("hidden", 1, 2)})
    with pytest.raises(EngineError, match="no resident buffer 'missing'"):
        engine.read("missing")


def test_missing_bmodel(sail, tmp_path):
    from lvb.runtime.sail import SailEngine

    with pytest.raises(EngineError, match="no such bmodel"):
        SailEngine(tmp_path / "absent.bmodel")
    other = tmp_path / "other.bmodel"
    other.write_bytes(b"not one")
    with pytest.raises(EngineError, match="sail could not load it on device 0"):
        SailEngine(other)
