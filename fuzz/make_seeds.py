#!/usr/bin/env python3
"""Writes the small starting seeds of the onnx_prepass and protocol_line targets.

The onnx_prepass input is one mode byte (bit 0: 0 = int8 routing, 1 = fold) then model.onnx
bytes; the fuzz target's bundle directory has a 4 KiB `model.onnx_data` and `sub/w.bin`.
Needs the `onnx` Python package.
"""
import os
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


def external(name, dtype, dims, offset, location="model.onnx_data"):
    t = TensorProto()
    t.name = name
    t.data_type = dtype
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def decoder(ext):
    n, k = 8, 64  # (n, k) int8 weight, one scale per 32
    if ext:
        w = external("w.q", TensorProto.INT8, [n, k], 0)
        s = external("w.s", TensorProto.FLOAT, [n, k // 32], 1024)
        e = external("e.q", TensorProto.INT8, [4, k], 0, "sub/w.bin")
        es = external("e.s", TensorProto.FLOAT, [4, k // 32], 2048)
    else:
        rng = np.random.default_rng(1)
        w = numpy_helper.from_array(rng.integers(-127, 127, (n, k), dtype=np.int8), "w.q")
        s = numpy_helper.from_array(np.full((n, k // 32), 0.01, np.float32), "w.s")
        e = numpy_helper.from_array(rng.integers(-127, 127, (16, k), dtype=np.int8), "e.q")
        es = numpy_helper.from_array(np.full((16, k // 32), 0.02, np.float32), "e.s")
    nodes = [
        helper.make_node("DequantizeLinear", ["e.q", "e.s"], ["e"], axis=1, block_size=32),
        helper.make_node("Gather", ["e", "input_ids"], ["h"], axis=0),
        helper.make_node("DequantizeLinear", ["w.q", "w.s"], ["w"], axis=1, block_size=32),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "wt"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "seq", n])],
        [w, s, e, es],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return model.SerializeToString()


def write(target, name, data):
    with open(os.path.join(HERE, "seeds", target, name), "wb") as f:
        f.write(data)


write("onnx_prepass", "decoder-inline", b"\x00" + decoder(False))
write("onnx_prepass", "decoder-inline-fold", b"\x01" + decoder(False))
write("onnx_prepass", "decoder-external", b"\x00" + decoder(True))
write("onnx_prepass", "decoder-external-fold", b"\x01" + decoder(True))
write(
    "protocol_line",
    "session",
    b"\x10PING\nINFO\r\nSET temp 0.7\nSET stop \\n\\x41 off\nGET\nGEN a\\tb\\\\c\n"
    b"CHAT hello\r\nSYSTEM be brief\nSTOP\n\x03QUIT\n\x04",
)
write("protocol_line", "framing", b"\x01abc\x08\x7f\xc3\xa9\x08\n\xff\xfe\n" + b"x" * 100 + b"\n\x00\r\n")
