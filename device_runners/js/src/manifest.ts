// Generated from device_runners/edgerun/manifest.py by
//   python -m edgerun.manifest --typescript > device_runners/js/src/manifest.ts
// Do not edit: the Python module is the one source of truth (a test fails on drift).

export const SCHEMA_VERSION = 2;

export interface Manifest {
  schema_version: number;
  edgetl_version: string;
  name: string;
  version: number;
  parent: Parent | null;
  target: string;
  precision: string;
  files: Record<string, FileEntry>;
  input: InputBlock;
  features: FeaturesBlock;
  labels: Array<string>;
  head: HeadBlock;
  optimizer: OptimizerBlock;
  train_step: TrainStepBlock;
  infer: GraphBlock;
  test_vectors: TestVectorsBlock;
  adapt: AdaptBlock;
  quantization: QuantBlock;
  checks: Record<string, unknown>;
  provenance: Record<string, unknown>;
  adabn?: AdaBNBlock;
  trainable?: TrainableBlock;
}

export interface Parent {
  version: number;
  manifest_sha256: string;
  backbone_sha256: string;
}

export interface FileEntry {
  path: string;
  sha256: string;
  bytes: number;
}

export interface InputBlock {
  name: string;
  shape: Array<number | null>;
  batch_size: number | null;
  signature: string | null;
  dtype: string;
  modality: string;
  layout: string;
  channels?: Array<string>;
  window?: number;
  stride?: number;
  sample_rate_hz?: number;
  preprocess?: Record<string, unknown>;
  image?: Record<string, unknown>;
  text?: Record<string, unknown>;
  names?: Array<string>;
  length_signatures?: Record<string, string>;
  data_dtype?: string;
}

export interface FeaturesBlock {
  name: string;
  dim: number;
}

export interface HeadBlock {
  kind: string;
  hidden: number;
  embedding_dim: number;
  params: Array<ParamSpec>;
  class_params: Array<string>;
  init_file: string;
  capacity: number;
  unused_bias: number;
  learn_scale?: boolean;
  l2sp?: number;
}

export interface ParamSpec {
  name: string;
  shape: Array<number>;
}

export interface OptimizerBlock {
  name: string;
  hparams: Record<string, number>;
  state: Array<StateSpec>;
}

export interface StateSpec {
  name: string;
  like: string | null;
  shape: Array<number>;
}

export interface TrainStepBlock {
  file: string;
  signature: string | null;
  inputs: Array<string>;
  outputs: Array<string>;
  batch_size: number | null;
  loss_output: string;
  targets_input: string;
  targets_encoding: string;
  sample_weight_input: string;
  hparam_inputs: Array<string>;
  dynamic_classes: boolean;
  trainer: string;
  anchor_inputs?: Record<string, string>;
  ort_training?: Record<string, unknown>;
  fused?: FusedStepBlock;
  run?: RunBlock;
  hparam_shape?: Array<number>;
}

export interface FusedStepBlock {
  file: string;
  signature: string | null;
  inputs: Array<string>;
  outputs: Array<string>;
  batch_size: number | null;
  steps: number | null;
  loss_output: string;
}

export interface RunBlock {
  file: string;
  signature: string | null;
  inputs: Array<string>;
  outputs: Array<string>;
  batch_size: number | null;
  loss_output: string;
  val_input: string;
  val_logits_output: string;
  epoch_prefix: string;
}

export interface GraphBlock {
  file: string;
  signature: string | null;
  inputs: Array<string>;
  outputs: Array<string>;
  batch_size: number | null;
}

export interface TestVectorsBlock {
  file: string;
  count: number;
  atol: number;
  train_steps: number;
  train_atol: number;
  logits_atol?: number;
}

export interface AdaptBlock {
  epochs: number;
  batch_size: number;
  val_fraction: number;
  gate?: GateBlock;
  patience?: number;
  mix?: Array<number>;
  class_balanced?: boolean;
  freeze_absent?: boolean;
  replay?: ReplayBlock;
}

export interface GateBlock {
  rule: string;
  alpha: number;
  chosen_on: string;
  max_forget?: number;
  folds?: number;
}

export interface ReplayBlock {
  weight: number;
  count: number;
  per_class?: number;
  min_per_class?: number;
  inputs?: number;
  source?: string;
}

export interface QuantBlock {
  input?: Quant | null;
  output?: Quant | null;
  scheme?: string;
  graph_io?: string;
  in_graph?: QuantIO;
}

export interface Quant {
  dtype: string;
  scale: number;
  zero_point: number;
}

export interface QuantIO {
  input?: Quant | null;
  output?: Quant | null;
}

export interface AdaBNBlock {
  batch_size: number;
  reference: string;
  layers: Array<BNLayer>;
  stats?: GraphBlock;
  features?: GraphBlock;
  atol?: number;
  features_atol?: number;
  unsupported?: string;
}

export interface BNLayer {
  name: string;
  channels: number;
  per_window?: number;
}

export interface TrainableBlock {
  spec: string;
  cut: CutBlock;
  params: Array<ParamSpec>;
  gradients: string;
}

export interface CutBlock {
  node: string;
  shape: Array<number>;
  parts?: Array<CutPart>;
}

export interface CutPart {
  node: string;
  shape: Array<number>;
  dtype: string;
}

export type TypeDesc =
  | "any" | "str" | "int" | "number" | "bool"
  | { nullable: TypeDesc } | { ref: string } | { list: TypeDesc } | { dict: TypeDesc };

export interface BlockDesc {
  required: string[];
  fields: Record<string, TypeDesc>;
}

export const SCHEMA: Record<string, BlockDesc> = {
  "Manifest": {
    "required": [
      "adapt",
      "checks",
      "edgetl_version",
      "features",
      "files",
      "head",
      "infer",
      "input",
      "labels",
      "name",
      "optimizer",
      "parent",
      "precision",
      "provenance",
      "quantization",
      "schema_version",
      "target",
      "test_vectors",
      "train_step",
      "version"
    ],
    "fields": {
      "schema_version": "int",
      "edgetl_version": "str",
      "name": "str",
      "version": "int",
      "parent": {
        "nullable": {
          "ref": "Parent"
        }
      },
      "target": "str",
      "precision": "str",
      "files": {
        "dict": {
          "ref": "FileEntry"
        }
      },
      "input": {
        "ref": "InputBlock"
      },
      "features": {
        "ref": "FeaturesBlock"
      },
      "labels": {
        "list": "str"
      },
      "head": {
        "ref": "HeadBlock"
      },
      "optimizer": {
        "ref": "OptimizerBlock"
      },
      "train_step": {
        "ref": "TrainStepBlock"
      },
      "infer": {
        "ref": "GraphBlock"
      },
      "test_vectors": {
        "ref": "TestVectorsBlock"
      },
      "adapt": {
        "ref": "AdaptBlock"
      },
      "quantization": {
        "ref": "QuantBlock"
      },
      "checks": {
        "dict": "any"
      },
      "provenance": {
        "dict": "any"
      },
      "adabn": {
        "ref": "AdaBNBlock"
      },
      "trainable": {
        "ref": "TrainableBlock"
      }
    }
  },
  "Parent": {
    "required": [
      "backbone_sha256",
      "manifest_sha256",
      "version"
    ],
    "fields": {
      "version": "int",
      "manifest_sha256": "str",
      "backbone_sha256": "str"
    }
  },
  "FileEntry": {
    "required": [
      "bytes",
      "path",
      "sha256"
    ],
    "fields": {
      "path": "str",
      "sha256": "str",
      "bytes": "int"
    }
  },
  "InputBlock": {
    "required": [
      "batch_size",
      "dtype",
      "layout",
      "modality",
      "name",
      "shape",
      "signature"
    ],
    "fields": {
      "name": "str",
      "shape": {
        "list": {
          "nullable": "int"
        }
      },
      "batch_size": {
        "nullable": "int"
      },
      "signature": {
        "nullable": "str"
      },
      "dtype": "str",
      "modality": "str",
      "layout": "str",
      "channels": {
        "list": "str"
      },
      "window": "int",
      "stride": "int",
      "sample_rate_hz": "number",
      "preprocess": {
        "dict": "any"
      },
      "image": {
        "dict": "any"
      },
      "text": {
        "dict": "any"
      },
      "names": {
        "list": "str"
      },
      "length_signatures": {
        "dict": "str"
      },
      "data_dtype": "str"
    }
  },
  "FeaturesBlock": {
    "required": [
      "dim",
      "name"
    ],
    "fields": {
      "name": "str",
      "dim": "int"
    }
  },
  "HeadBlock": {
    "required": [
      "capacity",
      "class_params",
      "embedding_dim",
      "hidden",
      "init_file",
      "kind",
      "params",
      "unused_bias"
    ],
    "fields": {
      "kind": "str",
      "hidden": "int",
      "embedding_dim": "int",
      "params": {
        "list": {
          "ref": "ParamSpec"
        }
      },
      "class_params": {
        "list": "str"
      },
      "init_file": "str",
      "capacity": "int",
      "unused_bias": "number",
      "learn_scale": "bool",
      "l2sp": "number"
    }
  },
  "ParamSpec": {
    "required": [
      "name",
      "shape"
    ],
    "fields": {
      "name": "str",
      "shape": {
        "list": "int"
      }
    }
  },
  "OptimizerBlock": {
    "required": [
      "hparams",
      "name",
      "state"
    ],
    "fields": {
      "name": "str",
      "hparams": {
        "dict": "number"
      },
      "state": {
        "list": {
          "ref": "StateSpec"
        }
      }
    }
  },
  "StateSpec": {
    "required": [
      "like",
      "name",
      "shape"
    ],
    "fields": {
      "name": "str",
      "like": {
        "nullable": "str"
      },
      "shape": {
        "list": "int"
      }
    }
  },
  "TrainStepBlock": {
    "required": [
      "batch_size",
      "dynamic_classes",
      "file",
      "hparam_inputs",
      "inputs",
      "loss_output",
      "outputs",
      "sample_weight_input",
      "signature",
      "targets_encoding",
      "targets_input",
      "trainer"
    ],
    "fields": {
      "file": "str",
      "signature": {
        "nullable": "str"
      },
      "inputs": {
        "list": "str"
      },
      "outputs": {
        "list": "str"
      },
      "batch_size": {
        "nullable": "int"
      },
      "loss_output": "str",
      "targets_input": "str",
      "targets_encoding": "str",
      "sample_weight_input": "str",
      "hparam_inputs": {
        "list": "str"
      },
      "dynamic_classes": "bool",
      "trainer": "str",
      "anchor_inputs": {
        "dict": "str"
      },
      "ort_training": {
        "dict": "any"
      },
      "fused": {
        "ref": "FusedStepBlock"
      },
      "run": {
        "ref": "RunBlock"
      },
      "hparam_shape": {
        "list": "int"
      }
    }
  },
  "FusedStepBlock": {
    "required": [
      "batch_size",
      "file",
      "inputs",
      "loss_output",
      "outputs",
      "signature",
      "steps"
    ],
    "fields": {
      "file": "str",
      "signature": {
        "nullable": "str"
      },
      "inputs": {
        "list": "str"
      },
      "outputs": {
        "list": "str"
      },
      "batch_size": {
        "nullable": "int"
      },
      "steps": {
        "nullable": "int"
      },
      "loss_output": "str"
    }
  },
  "RunBlock": {
    "required": [
      "batch_size",
      "epoch_prefix",
      "file",
      "inputs",
      "loss_output",
      "outputs",
      "signature",
      "val_input",
      "val_logits_output"
    ],
    "fields": {
      "file": "str",
      "signature": {
        "nullable": "str"
      },
      "inputs": {
        "list": "str"
      },
      "outputs": {
        "list": "str"
      },
      "batch_size": {
        "nullable": "int"
      },
      "loss_output": "str",
      "val_input": "str",
      "val_logits_output": "str",
      "epoch_prefix": "str"
    }
  },
  "GraphBlock": {
    "required": [
      "batch_size",
      "file",
      "inputs",
      "outputs",
      "signature"
    ],
    "fields": {
      "file": "str",
      "signature": {
        "nullable": "str"
      },
      "inputs": {
        "list": "str"
      },
      "outputs": {
        "list": "str"
      },
      "batch_size": {
        "nullable": "int"
      }
    }
  },
  "TestVectorsBlock": {
    "required": [
      "atol",
      "count",
      "file",
      "train_atol",
      "train_steps"
    ],
    "fields": {
      "file": "str",
      "count": "int",
      "atol": "number",
      "train_steps": "int",
      "train_atol": "number",
      "logits_atol": "number"
    }
  },
  "AdaptBlock": {
    "required": [
      "batch_size",
      "epochs",
      "val_fraction"
    ],
    "fields": {
      "epochs": "int",
      "batch_size": "int",
      "val_fraction": "number",
      "gate": {
        "ref": "GateBlock"
      },
      "patience": "int",
      "mix": {
        "list": "number"
      },
      "class_balanced": "bool",
      "freeze_absent": "bool",
      "replay": {
        "ref": "ReplayBlock"
      }
    }
  },
  "GateBlock": {
    "required": [
      "alpha",
      "chosen_on",
      "rule"
    ],
    "fields": {
      "rule": "str",
      "alpha": "number",
      "chosen_on": "str",
      "max_forget": "number",
      "folds": "int"
    }
  },
  "ReplayBlock": {
    "required": [
      "count",
      "weight"
    ],
    "fields": {
      "weight": "number",
      "count": "int",
      "per_class": "int",
      "min_per_class": "int",
      "inputs": "int",
      "source": "str"
    }
  },
  "QuantBlock": {
    "required": [],
    "fields": {
      "input": {
        "nullable": {
          "ref": "Quant"
        }
      },
      "output": {
        "nullable": {
          "ref": "Quant"
        }
      },
      "scheme": "str",
      "graph_io": "str",
      "in_graph": {
        "ref": "QuantIO"
      }
    }
  },
  "Quant": {
    "required": [
      "dtype",
      "scale",
      "zero_point"
    ],
    "fields": {
      "dtype": "str",
      "scale": "number",
      "zero_point": "int"
    }
  },
  "QuantIO": {
    "required": [],
    "fields": {
      "input": {
        "nullable": {
          "ref": "Quant"
        }
      },
      "output": {
        "nullable": {
          "ref": "Quant"
        }
      }
    }
  },
  "AdaBNBlock": {
    "required": [
      "batch_size",
      "layers",
      "reference"
    ],
    "fields": {
      "batch_size": "int",
      "reference": "str",
      "layers": {
        "list": {
          "ref": "BNLayer"
        }
      },
      "stats": {
        "ref": "GraphBlock"
      },
      "features": {
        "ref": "GraphBlock"
      },
      "atol": "number",
      "features_atol": "number",
      "unsupported": "str"
    }
  },
  "BNLayer": {
    "required": [
      "channels",
      "name"
    ],
    "fields": {
      "name": "str",
      "channels": "int",
      "per_window": "int"
    }
  },
  "TrainableBlock": {
    "required": [
      "cut",
      "gradients",
      "params",
      "spec"
    ],
    "fields": {
      "spec": "str",
      "cut": {
        "ref": "CutBlock"
      },
      "params": {
        "list": {
          "ref": "ParamSpec"
        }
      },
      "gradients": "str"
    }
  },
  "CutBlock": {
    "required": [
      "node",
      "shape"
    ],
    "fields": {
      "node": "str",
      "shape": {
        "list": "int"
      },
      "parts": {
        "list": {
          "ref": "CutPart"
        }
      }
    }
  },
  "CutPart": {
    "required": [
      "dtype",
      "node",
      "shape"
    ],
    "fields": {
      "node": "str",
      "shape": {
        "list": "int"
      },
      "dtype": "str"
    }
  }
};
