"""Text backbones to ONNX through optimum, int8 through optimum's ``ORTQuantizer``.

The encoder is written as a sentence-transformers folder and exported by optimum-onnx's
sentence-transformers support, so mean pooling and L2 normalisation are in the graph
(output ``sentence_embedding``; the per-token output is dropped from the bundle).

int8 is optimum's ``ORTQuantizer`` with the ``arm64`` dynamic configuration: int8 weights
per channel, uint8 activations quantised at run time from each input's own range (U8S8,
onnxruntime's ``MatMulInteger`` path on ARM64 and x86-64). Dynamic rather than static,
because a transformer's activation ranges change with every sentence (attention, GELU,
residual stream) and calibration on glosses would clip fortunes; it needs no calibration
data and is what optimum recommends for encoder models on CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from edgetl.errors import require
from edgetl.progress import quiet_loggers

log = logging.getLogger(__name__)

OUTPUT = "sentence_embedding"
INPUTS = ["input_ids", "attention_mask"]


@contextlib.contextmanager
def _quiet():
    """Keep optimum/transformers' tracer warnings and info lines off the terminal."""
    with (quiet_loggers("optimum", "transformers", "sentence_transformers", "torch.onnx"),
          warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO())):
        warnings.simplefilter("ignore")
        yield


def optimum_version() -> str:
    """``optimum-onnx X (optimum Y)``."""
    from importlib.metadata import version

    return f"optimum-onnx {version('optimum-onnx')} (optimum {version('optimum')})"


def export_onnx(encoder, path: Path, *, opset: int, precision: str,
                max_length: int) -> dict[str, Any]:
    """Write ``encoder`` (a :class:`~edgetl.text.encoder.SentenceEncoder`) as an ONNX backbone.

    Returns the backbone signature (inputs, output, dynamic batch) and, for int8, the
    quantization facts for the manifest.
    """
    require("optimum.exporters.onnx", "text")
    import onnx
    from optimum.exporters.onnx import main_export

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".optimum-") as tmp:
        tmp = Path(tmp)
        st = encoder.save_sentence_transformers(tmp / "st", max_length)
        with _quiet():
            main_export(str(st), output=str(tmp / "onnx"), task="feature-extraction",
                        library_name="sentence_transformers", opset=opset, device="cpu",
                        do_validation=False)
        model = onnx.load(str(tmp / "onnx" / "model.onnx"))
        names = [o.name for o in model.graph.output]
        if OUTPUT not in names:
            raise RuntimeError(f"optimum's graph has outputs {names}, expected {OUTPUT!r}")
        for o in [o for o in model.graph.output if o.name != OUTPUT]:
            model.graph.output.remove(o)  # the per-token states stay internal
        got = [i.name for i in model.graph.input]
        if got != INPUTS:
            raise RuntimeError(f"optimum's graph takes {got}, expected {INPUTS}")
        sig = {"inputs": INPUTS, "outputs": [OUTPUT], "batch_size": None,
               "exporter": optimum_version()}
        if precision == "fp32":
            onnx.save(model, str(path))
            return sig
        fp32 = tmp / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        onnx.save(model, str(fp32))
        scheme = quantize_dynamic_int8(fp32, path)
        return {**sig, "quantization": scheme}


def quantize_dynamic_int8(fp32: Path, out: Path) -> dict:
    """Optimum ``ORTQuantizer`` (arm64 dynamic config) on ``fp32``; writes ``out``."""
    require("optimum.onnxruntime", "text")
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qcfg = AutoQuantizationConfig.arm64(is_static=False, per_channel=True)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".ortquant-") as tmp, _quiet():
        q = ORTQuantizer.from_pretrained(str(Path(fp32).parent), file_name=Path(fp32).name)
        q.quantize(save_dir=tmp, quantization_config=qcfg)
        made = sorted(Path(tmp).glob("*.onnx"))
        if len(made) != 1:
            raise RuntimeError(f"ORTQuantizer wrote {made}, expected one .onnx file")
        made[0].replace(out)
    return {"scheme": "dynamic int8 (optimum ORTQuantizer, arm64 config): per-channel "
                      "symmetric int8 weights, uint8 activations quantised per input at run "
                      "time (U8S8 MatMulInteger)",
            "tool": optimum_version(),
            "operators": sorted(qcfg.operators_to_quantize or [])}
