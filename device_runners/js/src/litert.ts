/**
 * TFLite bundles through LiteRT.js (`@litertjs/core`) signature runners
 * (`model.signatures.<name>.run({name: Tensor})`), as the Python runner's `LiteRTBackend`:
 * the backbone at its fixed batch (`input.batch_size`, padded with zero rows), the head's
 * `infer` at its fixed batch (`infer.batch_size`, padded), the train step at the manifest's
 * fixed batch (the caller pads with sample weight 0) and hyper-parameters shaped as
 * `train_step.hparam_shape`, and the fused K-step train graph (`train_step.fused`: a fixed
 * K of full batches stacked) where the bundle ships one. The app loads LiteRT.js (`await loadLiteRt(wasmDir)`) and passes
 * the module, so this package depends on no LiteRT.js build; the structural types below are
 * what it uses of `@litertjs/core` 2.5.
 */
import { Backend, F32, requireStateless } from "./backend.js";
import { Bundle } from "./bundle.js";
import { RunnerError } from "./errors.js";
import type { FusedStepBlock } from "./manifest.js";

/** A LiteRT.js tensor (what this package uses of `@litertjs/core`'s `Tensor`). */
export interface LiteRtTensor {
  readonly type: { layout: { dimensions: ArrayLike<number> } };
  toTypedArray(): ArrayLike<number>;
  /** Where its data lives (`wasm`: CPU memory this package can read). */
  readonly accelerator?: string;
  moveTo?(destination: "wasm"): Promise<LiteRtTensor>;
  delete(): void;
}

/** One tensor of a signature (`getInputDetails()` / `getOutputDetails()`). */
export interface LiteRtTensorDetails {
  readonly name: string;
  readonly dtype: string;
  readonly shape: ArrayLike<number>;
}

/** A signature runner of a compiled model. */
export interface LiteRtSignature {
  getInputDetails(): readonly LiteRtTensorDetails[];
  getOutputDetails(): readonly LiteRtTensorDetails[];
  run(input: Record<string, LiteRtTensor>): Promise<Record<string, LiteRtTensor>>;
}

export interface LiteRtModel {
  readonly signatures: Record<string, LiteRtSignature>;
  delete?(): void;
}

/** What this package needs of the LiteRT.js module (after `loadLiteRt`). */
export interface LiteRt {
  loadAndCompile(model: Uint8Array, options: { accelerator: "wasm" }): Promise<LiteRtModel>;
  Tensor: new (data: Float32Array, shape: number[]) => LiteRtTensor;
}

export interface LiteRtBackendOptions {
  /** Name in reports (default `litert.js`). */
  name?: string;
  /** `report.backend_version` (LiteRT.js exposes none; the app states the one it ships). */
  version?: string;
  /** Train full batches through the bundle's fused K-step graph (`train_step.fused`) where it
   * ships one (default true); false: one step per call (same results, more calls). */
  fused?: boolean;
}

const prod = (d: readonly number[]) => d.reduce((a, b) => a * b, 1);

/** Backbone, train and infer signature runners of a TFLite bundle. */
export class LiteRtBackend implements Backend {
  readonly trainer = "stateless";
  private constructor(private readonly lrt: LiteRt, private readonly bundle: Bundle,
    private readonly bb: LiteRtSignature, private readonly train: LiteRtSignature,
    private readonly inf: LiteRtSignature, private readonly models: LiteRtModel[],
    readonly name: string, readonly version: string,
    private readonly trainK: LiteRtSignature | null, readonly fused: FusedStepBlock | null) {}

  get trainerVersion(): string { return this.version; }

  static async create(lrt: LiteRt, bundle: Bundle, opts: LiteRtBackendOptions = {}): Promise<LiteRtBackend> {
    const m = bundle.manifest;
    const version = opts.version ?? "unknown";
    const name = opts.name ?? "litert.js";
    if (m.target !== "tflite") {
      throw new RunnerError(`bundle target '${m.target}' is not a TFLite bundle: LiteRT.js ` +
        "runs tflite bundles; run ONNX bundles with OrtBackend (onnxruntime), or export with " +
        "--target tflite");
    }
    requireStateless(m);
    if (m.input.length_signatures && Object.keys(m.input.length_signatures).length) {
      throw new RunnerError("this TFLite text bundle has one backbone signature per sequence " +
        "length, which the LiteRT.js backend does not run yet; use its onnx export in this " +
        "runner, or the Python runner");
    }
    const q = (m.quantization ?? {}) as Record<string, unknown>;
    if (q.input || q.output || (m.input.dtype && m.input.dtype !== "float32")) {
      throw new RunnerError(`this bundle's backbone takes or returns ${String(
        (q.input as { dtype?: string } | null)?.dtype ?? m.input.dtype)} tensors; LiteRT.js ` +
        "2.5 binds float32, int32 and uint8 only (Element type INT8 is not supported): " +
        "re-export with export.int8_io float32 (the default), which quantises inside the graph");
    }
    const models = new Map<string, LiteRtModel>();
    const load = async (role: string): Promise<LiteRtModel> => {
      const got = models.get(role);
      if (got) return got;
      const path = m.files[role]?.path ?? role;
      try {
        const model = await lrt.loadAndCompile(bundle.file(role), { accelerator: "wasm" });
        models.set(role, model);
        return model;
      } catch (e) {
        if (e instanceof RunnerError) throw e;
        throw new RunnerError(`LiteRT.js ${version} cannot load ${path}: ` +
          `${String(e instanceof Error ? e.message : e).slice(0, 300)}`);
      }
    };
    const sig = async (role: string, signature: string | null, where: string) => {
      const model = await load(role);
      const path = m.files[role]?.path ?? role;
      const names = Object.keys(model.signatures);
      const s = signature === null ? (names.length === 1 ? model.signatures[names[0]] : undefined)
        : model.signatures[signature];
      if (!s) {
        throw new RunnerError(`${path} has no signature ${JSON.stringify(signature)} (manifest ` +
          `${where}.signature); it has ${JSON.stringify(names)}: the bundle is damaged, re-export it`);
      }
      return s;
    };
    const bb = await sig("backbone", m.input.signature, "input");
    const train = await sig(m.train_step.file, m.train_step.signature, "train_step");
    const inf = await sig(m.infer.file, m.infer.signature, "infer");
    const check = (s: LiteRtSignature, where: string, want: string[], outputs = false) => {
      const have = (outputs ? s.getOutputDetails() : s.getInputDetails()).map((d) => d.name);
      const missing = want.filter((n) => !have.includes(n));
      if (missing.length) {
        throw new RunnerError(`manifest.json: ${where} names ${JSON.stringify(missing)}, which ` +
          `the graph's signature lacks (it has ${JSON.stringify(have.sort())}); the bundle is ` +
          "damaged, re-export it");
      }
    };
    check(bb, "input.name", [m.input.name]);
    check(bb, "features.name", [m.features.name], true);
    check(train, "train_step.inputs", m.train_step.inputs);
    check(inf, "infer.inputs", m.infer.inputs);
    const fz = opts.fused === false ? null : m.train_step.fused ?? null;
    let trainK: LiteRtSignature | null = null;
    if (fz) { // K batches stacked on a leading axis (adapt.ts fusedGroups), K fixed in the graph
      if (!m.files[fz.file]) {
        throw new RunnerError(`manifest.json: train_step.fused.file '${fz.file}' names no file ` +
          `(known roles: ${JSON.stringify(Object.keys(m.files).sort())}); the bundle is damaged: ` +
          "re-export it");
      }
      trainK = await sig(fz.file, fz.signature, "train_step.fused");
      check(trainK, "train_step.fused.inputs", fz.inputs);
      check(trainK, "train_step.fused.outputs", fz.outputs, true);
      const want = [fz.steps, fz.batch_size ?? m.train_step.batch_size];
      const feat = trainK.getInputDetails().find((d) => d.name === m.train_step.inputs[0]);
      const have = feat ? Array.from(feat.shape).slice(0, 2) : [];
      if (want.some((v) => v === null || v === undefined) || have.length !== 2 ||
        have[0] !== want[0] || have[1] !== want[1]) {
        throw new RunnerError(`manifest.json: train_step.fused.steps and .batch_size ` +
          `${JSON.stringify(want)} must be the fixed (steps, batch) of ` +
          `${m.files[fz.file].path}'s features, which are ${JSON.stringify(have)}: the bundle ` +
          "is damaged, re-export it");
      }
    }
    return new LiteRtBackend(lrt, bundle, bb, train, inf, [...models.values()], name, version,
      trainK, trainK ? fz : null);
  }

  /** Run a signature on float32 feeds; float32 outputs copied out of WASM memory. */
  private async run(s: LiteRtSignature, feeds: Record<string, F32>): Promise<Record<string, F32>> {
    const ins: Record<string, LiteRtTensor> = {};
    const out: Record<string, F32> = {};
    try {
      for (const [k, v] of Object.entries(feeds)) ins[k] = new this.lrt.Tensor(v.data, v.dims);
      let res: Record<string, LiteRtTensor>;
      try {
        res = await s.run(ins);
      } catch (e) {
        throw new RunnerError(`LiteRT.js ${this.version} failed to run a signature: ` +
          `${String(e instanceof Error ? e.message : e).slice(0, 300)}`);
      }
      for (const [k, t] of Object.entries(res)) {
        let host = t;
        if (t.moveTo && t.accelerator !== undefined && t.accelerator !== "wasm") {
          host = await t.moveTo("wasm");
        }
        const a = host.toTypedArray();
        if (!(a instanceof Float32Array)) {
          throw new RunnerError(`graph output ${k} is not float32; the bundle is damaged, re-export it`);
        }
        out[k] = { data: a.slice(), dims: Array.from(host.type.layout.dimensions) };
        if (host !== t) host.delete();
        t.delete();
      }
    } finally {
      for (const t of Object.values(ins)) t.delete();
    }
    return out;
  }

  /** Backbone features in the graph's fixed batch (`input.batch_size`, zero rows padded). */
  async features(x: Float32Array | BigInt64Array | Int32Array, n: number,
    inner: number[]): Promise<Float32Array> {
    const m = this.bundle.manifest;
    if (!(x instanceof Float32Array)) {
      throw new RunnerError("this TFLite bundle's backbone takes float32 windows; integer " +
        "inputs are not supported by the LiteRT.js backend");
    }
    const dim = m.features.dim;
    const b = m.input.batch_size || 1;
    const per = prod(inner);
    const out = new Float32Array(n * dim);
    for (let i = 0; i < n; i += b) {
      const rows = Math.min(b, n - i);
      const chunk = new Float32Array(b * per);
      chunk.set(x.subarray(i * per, (i + rows) * per));
      const r = await this.run(this.bb, { [m.input.name]: { data: chunk, dims: [b, ...inner] } });
      const f = r[m.features.name];
      if (f.data.length !== b * dim) {
        throw new RunnerError(`the backbone returned ${f.dims} features for ${b} windows; ` +
          `the manifest says features.dim ${dim}`);
      }
      out.set(f.data.subarray(0, rows * dim), i * dim);
    }
    return out;
  }

  /** One optimizer step (fixed batch: the caller pads with sample weight 0). */
  async trainStep(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    return this.run(this.train, feeds);
  }

  /** `fused.steps` optimizer steps in one call of the fused graph (full batches stacked);
   * outputs by name (the loss: one per step). */
  async trainSteps(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    if (this.trainK === null) {
      throw new RunnerError("this backend has no fused train graph (train_step.fused); train " +
        "one step per call (trainStep)");
    }
    return this.run(this.trainK, feeds);
  }

  /** Head logits and embedding of any number of rows, in the graph's fixed batch. */
  async infer(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    const m = this.bundle.manifest;
    const xName = m.infer.inputs[0];
    const x = feeds[xName];
    const n = x.dims[0];
    const d = prod(x.dims.slice(1));
    const b = m.infer.batch_size || Math.max(n, 1);
    const parts: Array<Record<string, F32>> = [];
    for (let i = 0; i < Math.max(n, 1); i += b) {
      const rows = Math.min(b, n - i);
      const chunk = new Float32Array(b * d);
      chunk.set(x.data.subarray(i * d, (i + rows) * d));
      const r = await this.run(this.inf, { ...feeds, [xName]: { data: chunk, dims: [b, ...x.dims.slice(1)] } });
      const cut: Record<string, F32> = {};
      for (const [k, v] of Object.entries(r)) {
        const per = prod(v.dims.slice(1));
        cut[k] = { data: v.data.slice(0, rows * per), dims: [rows, ...v.dims.slice(1)] };
      }
      parts.push(cut);
    }
    const out: Record<string, F32> = {};
    for (const k of Object.keys(parts[0])) {
      const data = new Float32Array(parts.reduce((s, p) => s + p[k].data.length, 0));
      let o = 0;
      for (const p of parts) { data.set(p[k].data, o); o += p[k].data.length; }
      out[k] = { data, dims: [n, ...parts[0][k].dims.slice(1)] };
    }
    return out;
  }

  /** Free the compiled models (LiteRT.js memory is not garbage-collected). */
  delete(): void {
    for (const mdl of this.models) mdl.delete?.();
  }
}
