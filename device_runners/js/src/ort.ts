/**
 * The ONNX Runtime sessions of a bundle, through the onnxruntime-common API: the app passes
 * its runtime module (`import * as ort from "onnxruntime-node"`, `"onnxruntime-web"` or
 * `"onnxruntime-react-native"`), so this package depends on none of them.
 */
import type * as ortc from "onnxruntime-common";
import { Backend, F32, requireStateless } from "./backend.js";
import { Bundle } from "./bundle.js";
import { RunnerError } from "./errors.js";
import type { FusedStepBlock, RunBlock } from "./manifest.js";

export type { F32 } from "./backend.js";

/** What this package needs of an onnxruntime JavaScript module. */
export interface Ort {
  InferenceSession: typeof ortc.InferenceSession;
  Tensor: typeof ortc.Tensor;
  env?: { versions?: Record<string, string | undefined> };
}

export interface BackendOptions {
  /** intra-op threads of the backbone session (0: the runtime's default). */
  threads?: number;
  /** Name in reports (default `onnxruntime-js`); the CLI says `onnxruntime-node`. */
  name?: string;
  /** Train full batches through the bundle's fused K-step graph (`train_step.fused`) where it
   * ships one (default true); false: one step per call (same results, more calls). */
  fused?: boolean;
  /** Train whole epochs through the bundle's whole-run graph (`train_step.run`) where it
   * ships one beside the fused graph (default true); false: one fused and one infer call per
   * epoch (same results within float32 rounding, more calls). */
  run?: boolean;
}

/** The manifest's `names` are exactly the graph's (`edgerun/backends.py` `check_io`): checked
 * at load, so a damaged manifest fails naming both lists, not in the first call. */
function checkIo(file: string, where: string, declared: readonly string[],
  graph: readonly string[], what = "inputs"): void {
  const a = [...declared].sort();
  const b = [...graph].sort();
  if (a.length !== b.length || a.some((x, i) => x !== b[i])) {
    throw new RunnerError(`manifest.json: ${where} ${JSON.stringify(a)} do not match the ${what} ` +
      `of ${file} ${JSON.stringify(b)}; the bundle is damaged or was written by another edgetl ` +
      "version: re-export it");
  }
}

/** Backbone, train-step and infer sessions of an ONNX bundle. */
export class OrtBackend implements Backend {
  readonly trainer = "stateless";
  private constructor(private readonly ort: Ort, private readonly bundle: Bundle,
    private readonly bb: ortc.InferenceSession, private readonly train: ortc.InferenceSession,
    private readonly inf: ortc.InferenceSession, readonly name: string,
    readonly version: string, private readonly trainK: ortc.InferenceSession | null,
    readonly fused: FusedStepBlock | null, private readonly trainR: ortc.InferenceSession | null,
    readonly runGraph: RunBlock | null) {}

  get trainerVersion(): string { return this.version; }

  static async create(ort: Ort, bundle: Bundle, opts: BackendOptions = {}): Promise<OrtBackend> {
    const m = bundle.manifest;
    if (m.target !== "onnx") {
      throw new RunnerError(`bundle target '${m.target}' is not an ONNX bundle: onnxruntime ` +
        "runs onnx bundles; run TFLite bundles with LiteRtBackend (LiteRT.js), or export with " +
        "--target onnx");
    }
    requireStateless(m);
    const version = ort.env?.versions?.common ?? "unknown";
    const sess = async (role: string, threads: number) => {
      try {
        return await ort.InferenceSession.create(bundle.file(role), {
          executionProviders: ["cpu"], logSeverityLevel: 3,
          ...(threads ? { intraOpNumThreads: threads } : {}),
        });
      } catch (e) {
        if (e instanceof RunnerError) throw e;
        throw new RunnerError(`onnxruntime ${version} cannot load ` +
          `${m.files[role]?.path ?? role}: ${String(e).slice(0, 300)}`);
      }
    };
    // head graphs on one thread, as the Python runner (a thread pool costs more than it saves)
    const bb = await sess("backbone", opts.threads ?? 0);
    const train = await sess(m.train_step.file, 1);
    const inf = await sess(m.infer.file, 1);
    const fz = opts.fused === false ? null : m.train_step.fused ?? null;
    // an optional train graph block (fused, run): its file loaded, its inputs and outputs
    // checked against the graph's
    type Block = { file: string; inputs: string[]; outputs: string[] };
    const block = async (key: string, b: Block) => {
      if (!m.files[b.file]) {
        throw new RunnerError(`manifest.json: train_step.${key}.file '${b.file}' names no file ` +
          `(known roles: ${JSON.stringify(Object.keys(m.files).sort())}); the bundle is damaged: ` +
          "re-export it");
      }
      const s = await sess(b.file, 1);
      const file = m.files[b.file]?.path ?? b.file;
      checkIo(file, `train_step.${key}.inputs`, b.inputs, s.inputNames);
      checkIo(file, `train_step.${key}.outputs`, b.outputs, s.outputNames, "outputs");
      return s;
    };
    // the K-step graph: the one-step feeds, batches stacked (adapt.ts fusedGroups)
    const trainK = fz ? await block("fused", fz) : null;
    // the whole-run graph: epochs of the fused graph and their validation logits (adapt.ts
    // runEpochs); loaded and checked as the Python runner's OrtBackend
    const rb = fz && opts.run !== false ? m.train_step.run ?? null : null;
    const trainR = rb ? await block("run", rb) : null;
    return new OrtBackend(ort, bundle, bb, train, inf, opts.name ?? "onnxruntime-js", version,
      trainK, fz, trainR, rb);
  }

  private tensor(v: F32): ortc.Tensor {
    return new this.ort.Tensor("float32", v.data, v.dims);
  }

  private static out(t: ortc.Tensor, name: string): F32 {
    if (t.type !== "float32") {
      throw new RunnerError(`graph output ${name} is ${t.type}, expected float32`);
    }
    return { data: t.data as Float32Array, dims: [...t.dims] };
  }

  private async run(s: ortc.InferenceSession, feeds: Record<string, F32>): Promise<Record<string, F32>> {
    const f: Record<string, ortc.Tensor> = {};
    for (const [k, v] of Object.entries(feeds)) f[k] = this.tensor(v);
    const r = await s.run(f);
    const out: Record<string, F32> = {};
    for (const [k, v] of Object.entries(r)) out[k] = OrtBackend.out(v, k);
    return out;
  }

  /** Backbone features of preprocessed windows `x` (`[n, ...inputShape]`), in chunks of 256. */
  async features(x: Float32Array | BigInt64Array | Int32Array, n: number,
    inner: number[]): Promise<Float32Array> {
    const m = this.bundle.manifest;
    if (m.input.modality === "text") return this.textFeatures(x as BigInt64Array, n, inner[1]);
    const dim = m.features.dim;
    const per = inner.reduce((a, b) => a * b, 1);
    const scheme = String((m.quantization as Record<string, unknown>).scheme ?? "");
    const batch = scheme.includes("dynamic") ? 1 : 256; // one activation scale per call
    const out = new Float32Array(n * dim);
    for (let i = 0; i < n; i += batch) {
      const b = Math.min(batch, n - i);
      const chunk = x.slice(i * per, (i + b) * per);
      const dims = [b, ...inner];
      const t = chunk instanceof Float32Array ? new this.ort.Tensor("float32", chunk, dims)
        : chunk instanceof BigInt64Array ? new this.ort.Tensor("int64", chunk, dims)
          : new this.ort.Tensor("int32", chunk, dims);
      const r = await this.bb.run({ [m.input.name]: t });
      const first = OrtBackend.out(r[this.bb.outputNames[0]], this.bb.outputNames[0]);
      if (first.data.length !== b * dim) {
        throw new RunnerError(`the backbone returned ${first.dims} features for ${b} windows; ` +
          `the manifest says features.dim ${dim}`);
      }
      out.set(first.data, i * dim);
    }
    return out;
  }

  /**
   * (N, 2, L) ids + mask: texts sorted by length (stable), each chunk of 32 (int8: 1) cut to
   * its longest text, as the Python runner (a text's features must not depend on the batch).
   */
  private async textFeatures(x: BigInt64Array, n: number, L: number): Promise<Float32Array> {
    const m = this.bundle.manifest;
    const dim = m.features.dim;
    const names = m.input.names ?? [];
    const scheme = String((m.quantization as Record<string, unknown>).scheme ?? "");
    const batch = scheme.includes("dynamic") ? 1 : 32;
    const nTok = Array.from({ length: n }, (_, i) => {
      let s = 0;
      for (let k = 0; k < L; k++) s += Number(x[(i * 2 + 1) * L + k]);
      return s;
    });
    const order = nTok.map((_, i) => i).sort((a, b) => nTok[a] - nTok[b] || a - b);
    const out = new Float32Array(n * dim);
    for (let i = 0; i < n; i += batch) {
      const idx = order.slice(i, i + batch);
      const len = Math.max(Math.max(...idx.map((j) => nTok[j])), 1);
      const feeds: Record<string, ortc.Tensor> = {};
      names.forEach((name, col) => {
        const a = new BigInt64Array(idx.length * len);
        idx.forEach((j, r) => a.set(x.subarray((j * 2 + col) * L, (j * 2 + col) * L + len), r * len));
        feeds[name] = new this.ort.Tensor("int64", a, [idx.length, len]);
      });
      const r = await this.bb.run(feeds);
      const f = OrtBackend.out(r[this.bb.outputNames[0]], this.bb.outputNames[0]);
      idx.forEach((j, r2) => out.set(f.data.subarray(r2 * dim, (r2 + 1) * dim), j * dim));
    }
    return out;
  }

  /** One optimizer step; outputs by name. */
  async trainStep(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    return this.run(this.train, feeds);
  }

  /** Several optimizer steps in one call of the fused graph (batches stacked); outputs by name. */
  async trainSteps(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    if (this.trainK === null) {
      throw new RunnerError("this backend has no fused train graph (train_step.fused); train " +
        "one step per call (trainStep)");
    }
    return this.run(this.trainK, feeds);
  }

  /** Epochs of fused steps and their validation logits in one call of the whole-run graph. */
  async trainRun(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    if (this.trainR === null) {
      throw new RunnerError("this backend has no whole-run graph (train_step.run); train one " +
        "epoch per call (trainSteps)");
    }
    return this.run(this.trainR, feeds);
  }

  /** Head logits and embedding. */
  async infer(feeds: Record<string, F32>): Promise<Record<string, F32>> {
    return this.run(this.inf, feeds);
  }

  /** Release every session (onnxruntime-web: its WASM memory); the backend is unusable after. */
  async release(): Promise<void> {
    for (const s of [this.bb, this.train, this.inf, this.trainK, this.trainR]) await s?.release();
  }
}
