"""Heavy imports done once, in the fork server, before cells fork from it.

Every cell is still its own process (forked from a server that has imported these and run
nothing else), so a crash or hang in one cell cannot take the run down.
"""

import importlib
import logging

from edgetl.progress import quiet_loggers

MODULES = (
    "numpy", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime.quantization",
    "litert_torch", "torchao.quantization.pt2e.quantize_pt2e", "ai_edge_litert.interpreter",
    "edgetl", "edgetl.export.model", "edgetl.export.load", "edgetl.export.bundle",
    "edgetl.export.onnx", "edgetl.export.tflite", "tools.coverage.cases",
)
#: transformers imports its model classes lazily; the cases' ones are imported here.
HF_CLASSES = (
    "MobileNetV2ForImageClassification", "MobileViTForImageClassification",
    "ResNetForImageClassification", "EfficientNetForImageClassification",
    "ConvNextForImageClassification", "ViTForImageClassification", "DeiTForImageClassification",
    "BertForSequenceClassification", "DistilBertForSequenceClassification",
    "Wav2Vec2ForSequenceClassification", "AutoModelForImageClassification",
    "AutoModelForSequenceClassification", "AutoModelForAudioClassification",
)

with quiet_loggers("torchao", "torch.utils._pytree", "transformers"):
    for _name in MODULES:
        try:
            importlib.import_module(_name)
        except ImportError as _e:  # the cell that needs it reports the failure
            logging.getLogger(__name__).warning("preload: %s", _e)
    import transformers as _transformers

    for _cls in HF_CLASSES:
        getattr(_transformers, _cls, None)
