"""Generate ONNX Runtime training artifacts for a head graph (standalone script).

Runs in the *separate* environment that has ``onnxruntime-training-cpu==1.19.2`` and
``onnx==1.17.0`` (it cannot share one with plain ``onnxruntime``), so it imports nothing
from edgetl and does not need torch::

    python _ort_artifacts.py HEAD.onnx OUT_DIR PARAM [PARAM ...]

Writes OUT_DIR/{training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint}
with edgetl's loss (weighted soft-target cross-entropy, the same as the stateless train
step: ``sum_i w_i CE_i / max(sum_i w_i, 1e-12)``) and ORT's SGD optimizer.
"""

import copy
import importlib.util
import os
import sys
import types

# This file sits next to edgetl/export/onnx.py: drop its folder from the import path, or
# `import onnx` below would import that module instead of the onnx package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def _training_package():
    # `import onnxruntime.training` imports torch through its optim package; register the
    # package without running its __init__ so artifacts/onnxblock load without torch.
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None:
            sys.exit("error: onnxruntime-training-cpu is not installed in this environment")
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "training")]
        sys.modules["onnxruntime.training"] = pkg
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)


def weighted_soft_ce():
    """The onnxblock loss, with graph inputs ``targets`` (B, C) float and ``sample_weight`` (B,)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils as gu

    class WeightedSoftCE(onnxblock.Block):
        def build(self, logits, targets="targets", weight="sample_weight"):
            g, nm = self.base.graph, gu.generate_graph_name
            t = copy.deepcopy(gu.get_output_from_output_name(self.base, logits))
            t.name = targets
            w = copy.deepcopy(t)
            w.name = weight
            del w.type.tensor_type.shape.dim[-1]
            g.input.extend([t, w])
            ax1, eps = nm("wce.axes1"), nm("wce.eps")
            g.initializer.extend([onnx.numpy_helper.from_array(np.array([1], np.int64), ax1),
                                  helper.make_tensor(eps, TensorProto.FLOAT, [], [1e-12])])
            logp, tl, ce, wce, num, ws, den, q, loss = (
                nm(f"wce.{s}") for s in "logp tl ce wce num ws den q loss".split())
            g.node.extend([
                helper.make_node("LogSoftmax", [logits], [logp], axis=-1, name=nm("LogSoftmax")),
                helper.make_node("Mul", [targets, logp], [tl], name=nm("Mul")),
                helper.make_node("ReduceSum", [tl, ax1], [ce], keepdims=0, name=nm("ReduceSum")),
                helper.make_node("Mul", [ce, weight], [wce], name=nm("Mul")),
                helper.make_node("ReduceSum", [wce], [num], keepdims=0, name=nm("ReduceSum")),
                helper.make_node("ReduceSum", [weight], [ws], keepdims=0, name=nm("ReduceSum")),
                helper.make_node("Max", [ws, eps], [den], name=nm("Max")),
                helper.make_node("Div", [num, den], [q], name=nm("Div")),
                helper.make_node("Neg", [q], [loss], name=nm("Neg")),
            ])
            return loss

    return WeightedSoftCE()


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    model_path, out, names = argv[0], argv[1], argv[2:]
    _training_package()
    import onnx
    from onnxruntime.training import artifacts

    os.makedirs(out, exist_ok=True)  # generate_artifacts needs it to exist
    artifacts.generate_artifacts(onnx.load(model_path), requires_grad=names, frozen_params=[],
                                 loss=weighted_soft_ce(), optimizer=artifacts.OptimType.SGD,
                                 artifact_directory=out)
    for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
        if not os.path.isfile(os.path.join(out, f)):
            sys.exit(f"error: generate_artifacts wrote no {f}")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
