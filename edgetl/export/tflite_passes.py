"""Flatbuffer passes run on every converted ``.tflite`` so that every LiteRT flavour loads it.

Each pass reads and rewrites the model in place with ``ai_edge_litert``'s flatbuffer object
API (no TensorFlow). They run from :data:`HEAD_PASSES` / :func:`float_io`:

- :func:`restore_names`: signature names ``a__b`` back to the contract's ``a.b``.
- :func:`unalias_outputs`: a signature output that *is* an input tensor (a linear head's
  ``embedding`` is its ``features``; a fixed cosine ``scale`` and its optimizer state, passed
  through the train step) gets its own tensor, copied by a RESHAPE to the same shape.
  Interpreter runtimes read such an output fine, but LiteRT.js binds one buffer per
  signature tensor, so the op reading the input saw an uninitialised buffer (wrong logits).
- :func:`float_io`: an int8 graph's int8 inputs / outputs become float32 ones, with QUANTIZE /
  DEQUANTIZE ops inside the graph (scale and zero point from the int8 tensor), as TF's
  converter does with ``inference_input_type=float32``. LiteRT.js 2.5 cannot bind int8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _schema():
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    return schema, fbu


def _name(n) -> str:
    return n.decode() if isinstance(n, bytes) else n


def _opcode(model, schema, op: int) -> int:
    """Index of builtin ``op`` in ``model.operatorCodes``, added if absent."""
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == op:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = op, min(op, 127), 1
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _tensor(model, sg, schema, like, name: str, *, dtype=None, data=None, quant=False) -> int:
    """Append a tensor shaped like ``like`` (or a constant holding ``data``) to ``sg``."""
    t = schema.TensorT()
    t.name = name
    if data is not None:
        buf = schema.BufferT()
        buf.data = np.frombuffer(data.tobytes(), np.uint8)
        model.buffers.append(buf)
        t.shape, t.type, t.buffer = list(data.shape), schema.TensorType.INT32, len(
            model.buffers) - 1
    else:
        t.shape = None if like.shape is None else list(like.shape)
        t.shapeSignature = None if like.shapeSignature is None else list(like.shapeSignature)
        t.type = like.type if dtype is None else dtype
        t.buffer = 0  # the empty sentinel buffer: written at run time
        t.quantization = like.quantization if quant else None
    t.hasRank = True
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _op(model, sg, schema, code: int, ins: list[int], outs: list[int], *, first=False):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(model, schema, code)
    op.inputs, op.outputs = ins, outs
    sg.operators.insert(0, op) if first else sg.operators.append(op)


def restore_names(model) -> None:
    """Rename signature tensors ``a__b`` back to ``a.b`` (torch.export forbids dots)."""
    for sd in model.signatureDefs:
        for tm in [*sd.inputs, *sd.outputs]:
            tm.name = _name(tm.name).replace("__", ".")


def unalias_outputs(model) -> list[str]:
    """Give every signature output that is also an input tensor a tensor of its own.

    Returns the ``signature:output`` names rewritten.
    """
    schema, _ = _schema()
    done = []
    for sd in model.signatureDefs:
        sg = model.subgraphs[sd.subgraphIndex]
        ins = {tm.tensorIndex for tm in sd.inputs} | set(sg.inputs)
        for tm in sd.outputs:
            if tm.tensorIndex not in ins:
                continue
            src = sg.tensors[tm.tensorIndex]
            shape = _tensor(model, sg, schema, src, f"{_name(src.name)}/shape",
                            data=np.asarray(src.shape, np.int32))
            new = _tensor(model, sg, schema, src, f"{_name(tm.name)}/copy", quant=True)
            _op(model, sg, schema, schema.BuiltinOperator.RESHAPE, [tm.tensorIndex, shape],
                [new])
            sg.outputs = [new if i == tm.tensorIndex else i for i in sg.outputs]
            tm.tensorIndex = new
            done.append(f"{_name(sd.signatureKey)}:{_name(tm.name)}")
    return done


def float_io(model) -> dict[str, dict]:
    """int8 / uint8 signature inputs and outputs -> float32, (de)quantised in the graph.

    Returns the (former) quantisation of each rewritten tensor by signature name, as
    ``{"dtype", "scale", "zero_point"}`` (what the graph now does internally).
    """
    schema, _ = _schema()
    tt = schema.TensorType
    done = {}
    for sd in model.signatureDefs:
        sg = model.subgraphs[sd.subgraphIndex]
        for tm, is_in in [*((t, True) for t in sd.inputs), *((t, False) for t in sd.outputs)]:
            q = sg.tensors[tm.tensorIndex]
            if q.type not in (tt.INT8, tt.UINT8):
                continue
            f = _tensor(model, sg, schema, q, f"{_name(tm.name)}/float", dtype=tt.FLOAT32)
            if is_in:  # float -> QUANTIZE -> the int8 tensor the first op reads
                _op(model, sg, schema, schema.BuiltinOperator.QUANTIZE, [f], [tm.tensorIndex],
                    first=True)
                sg.inputs = [f if i == tm.tensorIndex else i for i in sg.inputs]
            else:
                _op(model, sg, schema, schema.BuiltinOperator.DEQUANTIZE, [tm.tensorIndex], [f])
                sg.outputs = [f if i == tm.tensorIndex else i for i in sg.outputs]
            done[_name(tm.name)] = {
                "dtype": "int8" if q.type == tt.INT8 else "uint8",
                "scale": float(q.quantization.scale[0]),
                "zero_point": int(q.quantization.zeroPoint[0])}
            tm.tensorIndex = f
    return done


def rewrite(path: Path | str, *passes):
    """Run ``passes`` (functions of the model object) on the file at ``path``, in order.

    Returns each pass's result, in order.
    """
    _, fbu = _schema()
    model = fbu.read_model(str(path))
    results = [p(model) for p in passes]
    fbu.write_model(model, str(path))
    return results


def aliased_outputs(path: Path | str) -> list[str]:
    """``signature:output`` names whose tensor is one of that signature's input tensors."""
    _, fbu = _schema()
    model = fbu.read_model(str(path))
    return [f"{_name(sd.signatureKey)}:{_name(tm.name)}" for sd in model.signatureDefs
            for tm in sd.outputs if tm.tensorIndex in {t.tensorIndex for t in sd.inputs}]


#: What every head model gets after conversion, in order.
HEAD_PASSES = (restore_names, unalias_outputs)
