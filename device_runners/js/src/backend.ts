/**
 * What `adapt`, `selftest` and `infer` need of a runtime: backbone features, one optimizer
 * step of the head's train graph and the head's infer graph, all by tensor name. Two
 * implementations: `OrtBackend` (ONNX bundles: onnxruntime-node, -web, -react-native) and
 * `LiteRtBackend` (TFLite bundles: LiteRT.js signature runners).
 */

import { RunnerError } from "./errors.js";
import type { FusedStepBlock, Manifest, RunBlock } from "./manifest.js";

/** Refuse a bundle whose train step is not the stateless graph (the only one these backends
 * feed: parameters and optimizer state in, new ones out). */
export function requireStateless(m: Manifest): void {
  const trainer = m.train_step.trainer ?? "stateless";
  if (trainer !== "stateless") {
    throw new RunnerError(`this bundle trains with '${trainer}'; the TypeScript runner runs ` +
      "the stateless train-step graph only: export with --trainer stateless");
  }
}

/** A float32 tensor value: flat data and dims. */
export interface F32 {
  data: Float32Array;
  dims: number[];
}

export interface Backend {
  /** Name and version in reports (`report.backend`, `backend_version`). */
  readonly name: string;
  readonly version: string;
  /** `report.trainer` (`stateless`: the train-step graph with the optimizer state fed back). */
  readonly trainer: string;
  readonly trainerVersion: string;
  /** Backbone features of `n` preprocessed windows `x` (`[n, ...inner]`), `[n, dim]` flat. */
  features(x: Float32Array | BigInt64Array | Int32Array, n: number, inner: number[]): Promise<Float32Array>;
  /** One optimizer step (the caller pads to a fixed train batch with weight 0); outputs by name. */
  trainStep(feeds: Record<string, F32>): Promise<Record<string, F32>>;
  /** The manifest's `train_step.fused` block when `trainSteps` runs the bundle's K-step graph
   * (absent or null: one step per call), as the Python runner's `backend.fused`. */
  readonly fused?: FusedStepBlock | null;
  /** Several optimizer steps in one call of the fused graph: the one-step feeds with the
   * features, targets and sample weights of the steps stacked on a leading axis; outputs by
   * name (the loss: one per step). */
  trainSteps?(feeds: Record<string, F32>): Promise<Record<string, F32>>;
  /** The manifest's `train_step.run` block when `trainRun` runs the bundle's whole-run graph
   * (absent or null: one fused and one infer call per epoch), as the Python runner's
   * `backend.run_graph`. */
  readonly runGraph?: RunBlock | null;
  /** Epochs of fused steps and their validation logits in one call of the whole-run graph:
   * the fused feeds with one more leading axis (epochs, steps, N, ...) and `val_input`;
   * outputs by name (`loss` (epochs, steps), `new.*`, `<epoch_prefix><name>` (epochs, ...),
   * the validation logits (epochs, M, rows)). */
  trainRun?(feeds: Record<string, F32>): Promise<Record<string, F32>>;
  /** Release the runtime's sessions (optional; the backend is unusable afterwards). */
  release?(): Promise<void>;
  /** Head logits and embedding of any number of rows; outputs by name. */
  infer(feeds: Record<string, F32>): Promise<Record<string, F32>>;
}
