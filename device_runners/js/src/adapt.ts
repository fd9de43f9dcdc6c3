/**
 * Self-test, adaptation and inference, mirroring `edgerun/adapt.py`:
 * backbone features once (cached in memory) -> the stratified split -> head epochs with the
 * stateless train graph (optimizer state fed back), the epoch of lowest validation loss kept,
 * early stopping after `patience` epochs without a new lowest -> the WiSE-FT mix of lowest
 * validation loss -> the gate (one-sided exact McNemar) against the starting head.
 */
import { Bundle } from "./bundle.js";
import { Dataset, modality, preprocess, splitMode, stratifiedFolds } from "./data.js";
import { RunnerError } from "./errors.js";
import { imagesToInput, inputDims, manifestImageSpec } from "./image.js";
import * as gating from "./gate.js";
import { checkFinite, Head } from "./head.js";
import { Manifest } from "./manifest.js";
import { asFloat32, asNumbers, asStrings, parseNpz } from "./npy.js";
import { TextEncoder_ } from "./text.js";
import { Backend, F32 } from "./backend.js";
import * as replaying from "./replay.js";
import { defaultRng } from "./rng.js";

export const RUNNER_VERSION = "0.1.0-js";
export const GATE_DEFAULTS = { rule: "mcnemar", alpha: 0.05, folds: 1 };
export const PATIENCE_DEFAULT = 8;
export const MIX_DEFAULT = [0.25, 0.5, 0.75, 1.0];

const now = () => performance.now() / 1000;

function zeroState(m: Manifest, params: Map<string, F32>): Map<string, F32> {
  const s = new Map<string, F32>();
  for (const st of m.optimizer.state) {
    const dims = st.like === null ? st.shape : (params.get(st.like) as F32).dims;
    s.set(st.name, { data: new Float32Array(dims.reduce((a, b) => a * b, 1)), dims: [...dims] });
  }
  return s;
}

function anchorsOf(m: Manifest, params: Map<string, F32>): Map<string, F32> {
  const out = new Map<string, F32>();
  for (const [a, p] of Object.entries(m.train_step.anchor_inputs ?? {})) {
    const v = params.get(p) as F32;
    out.set(a, { data: v.data.slice(), dims: [...v.dims] });
  }
  return out;
}

function trainFeeds(m: Manifest, hp: Record<string, number>, f: F32, t: F32, w: F32,
  params: Map<string, F32>, state: Map<string, F32>, anchors: Map<string, F32>): Record<string, F32> {
  const ts = m.train_step;
  const feeds: Record<string, F32> = { [ts.inputs[0]]: f, [ts.targets_input]: t,
    [ts.sample_weight_input]: w };
  // 0-d unless the manifest states the graph's shape (TFLite: (1,); LiteRT.js wants it exact)
  const hpDims = ts.hparam_shape ?? [];
  for (const k of ts.hparam_inputs) feeds[k] = { data: Float32Array.of(hp[k]), dims: [...hpDims] };
  for (const [k, v] of params) feeds[k] = v;
  for (const [k, v] of state) feeds[k] = v;
  for (const [k, v] of anchors) feeds[k] = v;
  return feeds;
}

/** The new parameters and optimizer state of a train call, in place; the outputs are fresh
 * arrays owned by that call: no copies. */
function carry(out: Record<string, F32>, params: Map<string, F32>, state: Map<string, F32>): void {
  for (const k of [...params.keys()]) params.set(k, out["new." + k]);
  for (const k of [...state.keys()]) state.set(k, out["new." + k]);
}

/** One train step; updates `params` and `state` in place; returns the loss. */
async function step(backend: Backend, m: Manifest, hp: Record<string, number>, f: F32, t: F32,
  w: F32, params: Map<string, F32>, state: Map<string, F32>, anchors: Map<string, F32>): Promise<number> {
  const out = await backend.trainStep(trainFeeds(m, hp, f, t, w, params, state, anchors));
  carry(out, params, state);
  return out[m.train_step.loss_output].data[0];
}

/** `f.dims[0]` train steps in one call of the fused graph (`train_step.fused`); `f`, `t`, `w`:
 * the batches stacked, (K, N, D), (K, N, C), (K, N). Updates `params` and `state` in place;
 * returns the K losses (`edgerun/adapt.py` `_steps`). */
async function fusedSteps(backend: Backend, m: Manifest, hp: Record<string, number>, f: F32, t: F32,
  w: F32, params: Map<string, F32>, state: Map<string, F32>, anchors: Map<string, F32>): Promise<Float32Array> {
  const fz = backend.fused;
  if (!fz || !backend.trainSteps) throw new RunnerError("this backend has no fused train graph");
  const out = await backend.trainSteps(trainFeeds(m, hp, f, t, w, params, state, anchors));
  carry(out, params, state);
  return out[fz.loss_output].data;
}

/** Most steps in one call of a fused graph that takes any number (`steps` null): bounds the
 * stacked copy of the features a call holds (`edgerun/adapt.py` `MAX_FUSED_STEPS`). */
export const MAX_FUSED_STEPS = 64;

/** Steps per fused call for an epoch of `nWindows` in batches of `bs`, as the Python runner's
 * `fused_groups`: the batch order unchanged; a graph that takes any number of steps (`steps`
 * null) runs every batch of the epoch, the last partial one padded to `bs` rows of weight 0,
 * at most MAX_FUSED_STEPS per call; a fixed-K graph takes the full batches in groups of K and
 * the rest of the epoch runs one step per call. Empty without a fused graph. */
export function fusedGroups(backend: Backend, nWindows: number, bs: number): number[] {
  if (!backend.fused || !backend.trainSteps) return [];
  const k = backend.fused.steps;
  if (k) return new Array<number>(Math.floor(Math.floor(nWindows / bs) / k)).fill(k);
  const n = Math.ceil(nWindows / bs);
  const out: number[] = [];
  for (let i = 0; i < n; i += MAX_FUSED_STEPS) out.push(Math.min(MAX_FUSED_STEPS, n - i));
  return out;
}

/** Most bytes of stacked batches (features, targets, weights) and most steps in one call of
 * the whole-run graph (`edgerun/adapt.py` `MAX_RUN_BYTES`, `MAX_RUN_STEPS`). */
export const MAX_RUN_BYTES = 16 << 20;
export const MAX_RUN_STEPS = 256;

/** Epochs per call of the whole-run graph (`train_step.run`) for epochs of `nWindows` windows
 * of `dim` features in batches of `bs` over `nCls` class rows, as the Python runner's
 * `_Trainer.runs`: at most MAX_RUN_STEPS steps and MAX_RUN_BYTES of stacked batches a call;
 * 0: one fused and one infer call per epoch (no run graph, a fixed-K fused graph, steps
 * checked one by one (`fuse` false), or one epoch over those bounds). */
export function runEpochs(backend: Backend, fuse: boolean, nWindows: number, dim: number,
  bs: number, nCls: number): number {
  if (!(fuse && backend.runGraph && backend.trainRun && backend.fused && backend.trainSteps &&
    !backend.fused.steps)) return 0;
  const steps = Math.ceil(nWindows / bs);
  if (!steps) return 0;
  return Math.min(Math.floor(MAX_RUN_BYTES / (steps * bs * (dim + nCls + 1) * 4)),
    Math.floor(MAX_RUN_STEPS / steps));
}

function oneHot(labels: ArrayLike<number>, rows: number): Float32Array {
  const t = new Float32Array(labels.length * rows);
  for (let i = 0; i < labels.length; i++) t[i * rows + labels[i]] = 1;
  return t;
}

/** Largest |got - want| / max(1, |want|): absolute below 1, relative above (the train
 * self-test: a TFLite head's spare class rows sit at -10000). As edgerun.adapt.rel_err. */
function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    m = Math.max(m, Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i])));
  }
  return m;
}

function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let e = 0;
  for (let i = 0; i < a.length; i++) e = Math.max(e, Math.abs(a[i] - b[i]));
  return e;
}

async function inferHead(backend: Backend, m: Manifest, head: Head, feats: Float32Array,
  n: number): Promise<Record<string, F32>> {
  const names = m.infer.inputs;
  const feeds: Record<string, F32> = { [names[0]]: { data: feats, dims: [n, m.features.dim] } };
  for (const k of names.slice(1)) feeds[k] = head.params.get(k) as F32;
  return backend.infer(feeds);
}

/** Replay the shipped reference train steps; the max error, or refuse. */
export async function selftestTrain(bundle: Bundle, backend: Backend): Promise<number> {
  const m = bundle.manifest;
  const tv = m.test_vectors;
  const z = await parseNpz(bundle.file(tv.file), m.files[tv.file]?.path ?? tv.file);
  if (!z.has("train_loss")) {
    throw new RunnerError("the bundle's test vectors have no reference train steps; re-export the bundle");
  }
  const fa = z.get("train_features")!;
  const f = asFloat32(fa);
  const w = asFloat32(z.get("train_weights")!);
  const losses = asFloat32(z.get("train_loss")!);
  const labels = asNumbers(z.get("train_labels")!);
  const [steps, b, d] = fa.shape;
  const head = await Head.fromBundle(bundle);
  const rows = head.rows(m.head.class_params);
  const params = new Map(head.params);
  const state = zeroState(m, params);
  const anchors = anchorsOf(m, params);
  let err = 0;
  for (let i = 0; i < steps; i++) {
    const loss = await step(backend, m, m.optimizer.hparams,
      { data: f.slice(i * b * d, (i + 1) * b * d), dims: [b, d] },
      { data: oneHot(labels.slice(i * b, (i + 1) * b), rows), dims: [b, rows] },
      { data: w.slice(i * b, (i + 1) * b), dims: [b] }, params, state, anchors);
    err = Math.max(err, relErr([loss], [losses[i]]));
  }
  const finalErr = (p: Map<string, F32>) => {
    for (const [k, a] of z) {
      if (k.startsWith("train_final.")) {
        err = Math.max(err, relErr((p.get(k.slice(12)) as F32).data, asFloat32(a)));
      }
    }
  };
  finalErr(params);
  const groups = fusedGroups(backend, steps, 1);
  if (groups.length) { // the same steps, fused (a fixed K: the rest one step per call)
    const p = new Map(head.params);
    const s = zeroState(m, p);
    let i = 0;
    for (const g of groups) {
      const got = await fusedSteps(backend, m, m.optimizer.hparams,
        { data: f.slice(i * b * d, (i + g) * b * d), dims: [g, b, d] },
        { data: oneHot(labels.slice(i * b, (i + g) * b), rows), dims: [g, b, rows] },
        { data: w.slice(i * b, (i + g) * b), dims: [g, b] }, p, s, anchors);
      for (let k = 0; k < g; k++) err = Math.max(err, relErr([got[k]], [losses[i + k]]));
      i += g;
    }
    for (; i < steps; i++) {
      const loss = await step(backend, m, m.optimizer.hparams,
        { data: f.slice(i * b * d, (i + 1) * b * d), dims: [b, d] },
        { data: oneHot(labels.slice(i * b, (i + 1) * b), rows), dims: [b, rows] },
        { data: w.slice(i * b, (i + 1) * b), dims: [b] }, p, s, anchors);
      err = Math.max(err, relErr([loss], [losses[i]]));
    }
    finalErr(p);
  }
  const rb = backend.runGraph;
  if (rb && backend.trainRun && groups.length) {
    // the same steps as one epoch of the whole-run graph, and its validation logits (on the
    // first step's features) against the infer graph's with its final parameters
    const p = new Map(head.params);
    const s = zeroState(m, p);
    const feeds = trainFeeds(m, m.optimizer.hparams, { data: f, dims: [1, steps, b, d] },
      { data: oneHot(labels, rows), dims: [1, steps, b, rows] },
      { data: w, dims: [1, steps, b] }, p, s, anchors);
    feeds[rb.val_input] = { data: f.slice(0, b * d), dims: [b, d] };
    const out = await backend.trainRun(feeds);
    const got = out[rb.loss_output].data;
    for (let k = 0; k < steps; k++) err = Math.max(err, relErr([got[k]], [losses[k]]));
    const final = new Map([...p.keys()].map((k) => [k, out["new." + k]]));
    finalErr(final);
    const want = await inferHead(backend, m, new Head(final, head.labels), f.slice(0, b * d), b);
    err = Math.max(err, relErr(out[rb.val_logits_output].data, want.logits.data));
  }
  if (!(err <= tv.train_atol)) {
    throw new RunnerError(`self-test failed: ${backend.trainer} training on this runtime ` +
      `differs from the server's reference train steps by ${err.toPrecision(3)} (> ` +
      `${tv.train_atol}); the runtime build or the bundle is broken`);
  }
  return err;
}

/** Reference features and logits through this runtime; the max error, or refuse. */
export async function selftestForward(bundle: Bundle, backend: Backend): Promise<number> {
  const m = bundle.manifest;
  const tv = m.test_vectors;
  const z = await parseNpz(bundle.file(tv.file), m.files[tv.file]?.path ?? tv.file);
  const xa = z.get("x")!;
  if (z.has("texts")) { // text bundles: this device's tokenizer must give the server's ids
    const texts = asStrings(z.get("texts")!);
    const enc = new TextEncoder_(bundle);
    const ids = enc.encode(texts).x;
    const want = xa.data as BigInt64Array;
    const per = ids.length / texts.length;
    for (let i = 0; i < texts.length; i++) {
      for (let k = i * per; k < (i + 1) * per; k++) {
        if (ids[k] !== want[k]) {
          throw new RunnerError(`self-test failed: the tokenizer (${enc.name}) gives other ids ` +
            `than the server for '${texts[i].slice(0, 80)}'; the bundle's tokenizer files or ` +
            "this runner's tokenizer are inconsistent");
        }
      }
    }
  }
  const n = xa.shape[0];
  let f: Float32Array;
  if (modality(m) === "image") { // uint8 images of any size, preprocessed as device data
    const spec = manifestImageSpec(m);
    f = await backend.features(imagesToInput(xa.data as Uint8Array, xa.shape, spec), n,
      inputDims(spec));
  } else {
    const raw = xa.dtype[1] === "i" || xa.dtype[1] === "u"
      ? BigInt64Array.from(xa.data as ArrayLike<number | bigint>, (v) => BigInt(v)) : asFloat32(xa);
    f = await backend.features(preprocess(raw, m), n, xa.shape.slice(1));
  }
  const head = await Head.fromBundle(bundle);
  // the head runs on the shipped features (as the Python runner): its check does not inherit
  // the backbone's error (an int8 backbone's features may differ by quantisation steps)
  const shipped = asFloat32(z.get("features")!);
  const lg = (await inferHead(backend, m, head, shipped, n)).logits.data;
  const errF = maxAbs(f, shipped);
  const errL = maxAbs(lg, asFloat32(z.get("logits")!));
  const atolL = tv.logits_atol ?? tv.atol;
  for (const [what, err, atol] of [["backbone features", errF, tv.atol],
    ["head logits", errL, atolL]] as Array<[string, number, number]>) {
    if (!(err <= atol)) {
      throw new RunnerError(`self-test failed: this runtime's ${what} differ from the server's ` +
        `reference vectors by ${err.toPrecision(3)} (> ${atol}); the runtime build or the ` +
        "bundle is broken");
    }
  }
  return Math.max(errF, errL);
}

export async function selftest(bundle: Bundle, backend: Backend): Promise<number> {
  return Math.max(await selftestForward(bundle, backend), await selftestTrain(bundle, backend));
}

/** The windows `order[from .. to)` of `pool` into rows `row ..` of stacked batches: features
 * into `f` (rows of `dim`), one-hot targets into `t` (rows of `nCls`; zeros expected), sample
 * weights into `w`. One loop and no temporary arrays (a cold process runs this interpreted:
 * the closures, maps and one-hot arrays it replaced cost an adapt of 30 epochs 2-15 ms). */
function stackRows(pool: Pool, order: readonly number[], from: number, to: number, dim: number,
  nCls: number, f: Float32Array, t: Float32Array, w: Float32Array, row: number): void {
  const pf = pool.f;
  const py = pool.y;
  const pw = pool.w;
  for (let j = from, r = row; j < to; j++, r++) {
    const k = order[j];
    const src = k * dim;
    const dst = r * dim; // a native copy a row: a cold element loop costs 4x as much
    f.set(pf.subarray(src, src + dim), dst);
    t[r * nCls + py[k]] = 1;
    w[r] = pw[k];
  }
}

function gather(src: Float32Array, dim: number, idx: readonly number[]): Float32Array {
  const out = new Float32Array(idx.length * dim);
  for (let j = 0; j < idx.length; j++) {
    const s = idx[j] * dim;
    out.set(src.subarray(s, s + dim), j * dim);
  }
  return out;
}

interface Scores { loss: number; acc: number; right: boolean[] }

async function valScores(backend: Backend, m: Manifest, head: Head, feats: Float32Array,
  y: number[]): Promise<Scores> {
  const lg = (await inferHead(backend, m, head, feats, y.length)).logits;
  return scoresOf(lg.data, lg.dims[1], head.labels.length, y);
}

/** Validation loss, accuracy and per-window hits of `logits` (rows of `stride`, the first
 * `k` the labels') against `y`. */
function scoresOf(logits: Float32Array, stride: number, k: number, y: number[]): Scores {
  const n = y.length;
  const right = new Array<boolean>(n);
  let hits = 0;
  for (let i = 0; i < n; i++) {
    const o = i * stride;
    let best = 0;
    for (let c = 1; c < k; c++) if (logits[o + c] > logits[o + best]) best = c;
    right[i] = best === y[i];
    if (right[i]) hits++;
  }
  return { loss: gating.softmaxXent(logits, n, stride, k, y), acc: hits / n, right };
}

interface Proposal { cand: Head; w: number; s0: Scores; s: Scores }

/** The mix `start + w * (adapted - start)` of lowest validation loss over `mix` (ties: the
 * smaller weight); `edgerun/adapt.py` `propose`. */
async function propose(backend: Backend, m: Manifest, start: Head, adapted: Head,
  featsVa: Float32Array, yVa: number[], mix: number[]): Promise<Proposal> {
  const s0 = await valScores(backend, m, start, featsVa, yVa);
  let best: { w: number; s: Scores; cand: Head } | null = null;
  for (const w of [...mix].sort((a, b) => a - b)) {
    const params = new Map<string, F32>();
    for (const [k, v] of start.params) {
      params.set(k, { data: gating.mix(v.data, (adapted.params.get(k) as F32).data, w), dims: [...v.dims] });
    }
    const cand = new Head(params, start.labels);
    const s = await valScores(backend, m, cand, featsVa, yVa);
    if (best === null || s.loss < best.s.loss - 1e-7) best = { w, s, cand };
  }
  const b = best as { w: number; s: Scores; cand: Head };
  return { cand: b.cand, w: b.w, s0, s: b.s };
}

/** The proposal (mix of lowest validation loss) and the gate's verdict against `start`. */
export async function chooseHead(backend: Backend, m: Manifest, start: Head, adapted: Head,
  featsVa: Float32Array, yVa: number[], mix: number[],
  gate: { rule: string; alpha: number }): Promise<[Head, gating.Verdict]> {
  const p = await propose(backend, m, start, adapted, featsVa, yVa, mix);
  return [p.cand, verdictOf(p, gate)];
}

/** The gate's verdict on one split for a proposal of `propose` (`edgerun/adapt.py`
 * `verdict_of`). */
function verdictOf({ w, s0, s }: Proposal, gate: { rule: string; alpha: number }): gating.Verdict {
  const verdict = gating.decide(s0.right, s.right, gate.alpha, gate.rule);
  Object.assign(verdict, { mix_weight: w, val_loss_before: s0.loss, val_loss_after: s.loss,
    accuracy_before: s0.acc, accuracy_after: s.acc, folds: 1 });
  return verdict;
}

/** The verdict on paired predictions pooled over folds (`edgerun/adapt.py` `pooled_verdict`):
 * `pairs[0]` is the run's own split. */
export function pooledVerdict(pairs: [boolean[], boolean[]][],
  gate: { rule: string; alpha: number }): gating.Verdict {
  const v = gating.decide(pairs.flatMap(([a]) => a), pairs.flatMap(([, b]) => b), gate.alpha,
    gate.rule);
  const counts = pairs.map(([a, b]) => [b.filter((r, i) => r && !a[i]).length,
    a.filter((r, i) => r && !b[i]).length]);
  v.reason = `cross-validated over ${pairs.length} folds (${v.n} windows): ${v.reason}`;
  return { ...v, folds: pairs.length, fold_counts: counts };
}

/** What the epochs draw batches from (`edgerun/adapt.py` `training_pool`). */
interface Pool { f: Float32Array; y: number[]; w: Float32Array; idx: number[] }

function trainingPool(feats: Float32Array, y: number[], tr: number[], classBalanced: boolean,
  replay: replaying.ReplaySet | null, replayWeight: number): Pool {
  const sw = new Float32Array(y.length).fill(1);
  if (classBalanced) {
    const wts = classBalancedWeights(tr.map((i) => y[i]));
    tr.forEach((i, j) => { sw[i] = wts[j]; });
  }
  if (replay === null) return { f: feats, y, w: sw, idx: tr };
  const r = replay.y.length;
  const wR = replaying.weights(Float32Array.from(tr, (i) => sw[i]), r, replayWeight);
  const f = new Float32Array(feats.length + replay.features.length);
  f.set(feats);
  f.set(replay.features, feats.length);
  const w = new Float32Array(sw.length + r);
  w.set(sw);
  w.set(wR, sw.length);
  return { f, y: [...y, ...replay.y], w, idx: [...tr, ...replay.y.map((_, k) => y.length + k)] };
}

interface FitSettings {
  hp: Record<string, number>; anchors: Map<string, F32>; epochs: number; patience: number;
  bs: number; fixed: boolean; nCls: number; seed: number;
  /** Full batches through the backend's fused K-step graph where it has one (off when
   * `afterStep` must see every step: frozen rows, a time budget). */
  fuse: boolean;
  /** Whole epochs through the backend's whole-run graph where it has one and `fuse` holds
   * (off for the gate's evidence folds, as the Python runner's `train_fold`). */
  run: boolean;
  /** After every one-step call: restores frozen rows, and may stop training with a reason. */
  afterStep: (head: Head, epoch: number) => string | null;
  onEpoch?: (h: EpochRecord, epochs: number) => void | Promise<void>;
}

interface Fit {
  head: Head; history: EpochRecord[]; steps: number; stepsFused: number; stepsRun: number;
  stopped: string | null; early: string | null;
  best: { loss: number; params: Map<string, F32>; epoch: number } | null;
}

/** What one epoch did: its loss sum over `count` windows, its steps (`fused` of them in fused
 * calls, `run` in a whole-run call), why it stopped (null: complete), and the validation
 * scores of the head after it. */
interface EpochOut {
  total: number; count: number; steps: number; fused: number; run: number;
  stopped: string | null; val: { loss: number; acc: number };
}

function divergedAt(loss: number, epoch: number, hp: Record<string, number>): RunnerError {
  return new RunnerError(`training diverged (loss ${loss}) at epoch ${epoch + 1}; lower the ` +
    `learning rate (now ${hp.lr}) with --lr`);
}

/** One epoch over `order` (indices into `pool`): fused calls where it can, the rest one step
 * per call; updates `head.params` and `state` in place; scores the validation windows. */
async function oneEpoch(backend: Backend, m: Manifest, head: Head, state: Map<string, F32>,
  pool: Pool, order: number[], epoch: number, featsVa: Float32Array, yVa: number[],
  o: FitSettings): Promise<EpochOut> {
  const dim = m.features.dim;
  const { hp, anchors, bs, nCls } = o;
  let total = 0;
  let count = 0;
  let steps = 0;
  let fused = 0;
  let stopped: string | null = null;
  let done = 0; // the epoch's first full batches, in order, through the fused graph
  for (const g of o.fuse ? fusedGroups(backend, order.length, bs) : []) {
    // g batches of bs rows; the epoch's last partial batch padded with zeros (weight 0)
    const f = new Float32Array(g * bs * dim);
    const t = new Float32Array(g * bs * nCls);
    const w = new Float32Array(g * bs);
    stackRows(pool, order, done, Math.min(done + g * bs, order.length), dim, nCls, f, t, w, 0);
    const losses = await fusedSteps(backend, m, hp, { data: f, dims: [g, bs, dim] },
      { data: t, dims: [g, bs, nCls] }, { data: w, dims: [g, bs] }, head.params, state, anchors);
    for (let k = 0; k < g; k++) {
      if (!Number.isFinite(losses[k])) throw divergedAt(losses[k], epoch, hp);
      const n = Math.min(bs, order.length - done);
      total += losses[k] * n;
      count += n;
      steps++;
      done += n;
    }
    fused += g;
  }
  for (let i = done; i < order.length; i += bs) {
    const n = Math.min(bs, order.length - i);
    const rows = o.fixed ? bs : n; // pad to a fixed batch; weight 0 masks padding
    const f = new Float32Array(rows * dim);
    const t = new Float32Array(rows * nCls);
    const w = new Float32Array(rows);
    stackRows(pool, order, i, i + n, dim, nCls, f, t, w, 0);
    const loss = await step(backend, m, hp, { data: f, dims: [rows, dim] },
      { data: t, dims: [rows, nCls] }, { data: w, dims: [rows] }, head.params, state, anchors);
    stopped = o.afterStep(head, epoch);
    if (!Number.isFinite(loss)) throw divergedAt(loss, epoch, hp);
    total += loss * n;
    count += n;
    steps++;
    if (stopped) break;
  }
  const s = await valScores(backend, m, head, featsVa, yVa);
  return { total, count, steps, fused, run: 0, stopped, val: { loss: s.loss, acc: s.acc } };
}

/** The epochs `first` .. `first + orders.length - 1` (shuffles `orders`, drawn in order) in
 * one call of the whole-run graph (`edgerun/adapt.py` `_Trainer._run`): every batch of an
 * epoch, the last partial one padded to `bs` rows of weight 0, stacked (epochs, steps, bs,
 * ...), and the validation features. Per epoch, as consumed: `head.params` and `state` set to
 * that epoch's (`<epoch_prefix><name>`), and the same loss sum and validation scores as the
 * per-epoch path (its logits from the run graph's infer body). */
async function* runCall(backend: Backend, m: Manifest, head: Head, state: Map<string, F32>,
  pool: Pool, orders: number[][], first: number, featsVa: Float32Array, yVa: number[],
  o: FitSettings): AsyncGenerator<EpochOut> {
  const rb = backend.runGraph;
  if (!rb || !backend.trainRun) throw new RunnerError("this backend has no whole-run graph");
  const dim = m.features.dim;
  const { hp, anchors, bs, nCls } = o;
  const e = orders.length;
  const n = orders[0].length;
  const nSteps = Math.ceil(n / bs);
  const rows = nSteps * bs; // zeros past n: rows of weight 0 add nothing
  const f = new Float32Array(e * rows * dim);
  const t = new Float32Array(e * rows * nCls);
  const w = new Float32Array(e * rows);
  for (let i = 0; i < e; i++) stackRows(pool, orders[i], 0, n, dim, nCls, f, t, w, i * rows);
  const feeds = trainFeeds(m, hp, { data: f, dims: [e, nSteps, bs, dim] },
    { data: t, dims: [e, nSteps, bs, nCls] }, { data: w, dims: [e, nSteps, bs] },
    head.params, state, anchors);
  feeds[rb.val_input] = { data: featsVa, dims: [yVa.length, dim] };
  const out = await backend.trainRun(feeds);
  const losses = out[rb.loss_output].data;
  const lg = out[rb.val_logits_output];
  const [, mVa, stride] = lg.dims;
  const k = head.labels.length;
  const pre = rb.epoch_prefix;
  const perEpoch = (name: string, i: number): F32 => {
    const v = out[pre + name];
    const len = v.data.length / e;
    return { data: v.data.slice(i * len, (i + 1) * len), dims: v.dims.slice(1) };
  };
  for (let i = 0; i < e; i++) {
    let total = 0;
    for (let j = 0; j < nSteps; j++) {
      const loss = losses[i * nSteps + j];
      if (!Number.isFinite(loss)) throw divergedAt(loss, first + i, hp);
      total += loss * Math.min(bs, n - j * bs);
    }
    for (const name of [...head.params.keys()]) head.params.set(name, perEpoch(name, i));
    for (const name of [...state.keys()]) state.set(name, perEpoch(name, i));
    const s = scoresOf(lg.data.subarray(i * mVa * stride, (i + 1) * mVa * stride), stride, k, yVa);
    yield { total, count: n, steps: nSteps, fused: nSteps, run: nSteps, stopped: null,
      val: { loss: s.loss, acc: s.acc } };
  }
}

/** Epochs from `start` over `pool` with a fresh optimizer state; the epoch of lowest
 * validation loss kept, early stopping after `patience` epochs without a new lowest. With a
 * whole-run graph (`runEpochs`), epochs run in calls of several, their shuffles drawn in
 * order, with the same steps, losses and validation scores as one epoch per call; epochs
 * computed past an early stop are dropped. */
async function fit(backend: Backend, m: Manifest, start: Head, pool: Pool, featsVa: Float32Array,
  yVa: number[], o: FitSettings): Promise<Fit> {
  const head = start.copy();
  const state = zeroState(m, head.params);
  const rng = defaultRng(o.seed);
  const history: EpochRecord[] = [];
  let steps = 0;
  let stepsFused = 0;
  let stepsRun = 0;
  let stopped: string | null = null;
  let best: Fit["best"] = null;
  let early: string | null = null;
  const chunk = o.run ? runEpochs(backend, o.fuse, pool.idx.length, m.features.dim, o.bs,
    o.nCls) : 0;
  async function* epochs(): AsyncGenerator<EpochOut> {
    for (let epoch = 0; epoch < o.epochs;) {
      if (!chunk) {
        yield await oneEpoch(backend, m, head, state, pool, rng.permutation(pool.idx), epoch,
          featsVa, yVa, o);
        epoch++;
        continue;
      }
      const orders: number[][] = [];
      for (let i = epoch; i < Math.min(o.epochs, epoch + chunk); i++) {
        orders.push(rng.permutation(pool.idx));
      }
      yield* runCall(backend, m, head, state, pool, orders, epoch, featsVa, yVa, o);
      epoch += orders.length;
    }
  }
  let epoch = 0;
  for await (const r of epochs()) {
    steps += r.steps;
    stepsFused += r.fused;
    stepsRun += r.run;
    stopped = r.stopped;
    const rec = { epoch: epoch + 1, loss: r.total / Math.max(r.count, 1), val_loss: r.val.loss,
      val_accuracy: r.val.acc, complete: stopped === null };
    history.push(rec);
    await o.onEpoch?.(rec, o.epochs);
    if (best === null || r.val.loss < best.loss) {
      best = { loss: r.val.loss, epoch: epoch + 1,
        params: new Map([...head.params].map(([k, v]) => [k, { data: v.data.slice(), dims: [...v.dims] }])) };
    }
    if (!stopped && o.patience && epoch + 1 - best.epoch >= o.patience && epoch + 1 < o.epochs) {
      early = `validation loss has not improved for ${o.patience} epochs (best: epoch ` +
        `${best.epoch}, ${gating.pyFormat(best.loss, 4, "f")})`;
      break;
    }
    if (stopped) break;
    epoch++;
  }
  if (best !== null) head.params = best.params;
  return { head, history, steps, stepsFused, stepsRun, stopped, early, best };
}

export interface AdaptOptions {
  epochs?: number;
  batchSize?: number;
  valFraction?: number;
  lr?: number;
  seed?: number;
  /** Continue from this head (default: the bundle's). */
  head?: Head;
  /** Default: the bundle's `adapt.class_balanced`. */
  classBalanced?: boolean;
  /** Labels the local data lacks keep their starting class rows (default: the bundle's
   * `adapt.freeze_absent`). */
  freezeAbsent?: boolean;
  l2sp?: number;
  /** Bundles that train backbone tensors: their lr over the head's (default: the bundle's). */
  backboneLrScale?: number;
  gateAlpha?: number;
  gateRule?: string;
  patience?: number;
  mix?: number[];
  maxSeconds?: number;
  /** `performance.now()` when the run started (the budget counts from it; default: now). */
  startedAt?: number;
  /** Called after every epoch (awaited when it returns a promise: a page yields to the
   * browser there to draw its progress bar). */
  onEpoch?: (h: EpochRecord, epochs: number) => void | Promise<void>;
  /** Total weight of the bundle's replay set (server features trained beside the local
   * windows) relative to the local training windows; 0: off (default: the bundle's
   * `adapt.replay.weight`). */
  replayWeight?: number;
  /** Points of accuracy on the bundle's replay set an adapted head may lose and still be
   * kept; negative: no check (default: the bundle's `adapt.gate.max_forget`). */
  maxForget?: number;
  /** Pool the gate's evidence over this many validation folds, each from another training
   * run (1: the run's own split; default: the bundle's `adapt.gate.folds`). */
  gateFolds?: number;
  /** Skip the self-test (it runs by default, as in the Python runner). */
  skipSelftest?: boolean;
}

export interface EpochRecord {
  epoch: number; loss: number; val_loss: number; val_accuracy: number; complete: boolean;
}

export interface AdaptResult {
  /** `report.json` (the Python runner's fields; file paths filled in by the caller). */
  report: Record<string, unknown>;
  /** The head to write as `head.npz` when the gate kept it (`report.rolled_back` false). */
  head: Head;
  /** The starting head as a rollback writes it (new labels imprinted from every window; the
   * gate's baseline imprinted them from the training windows only). */
  start: Head;
  /** The head to use from now on: `head` if the gate kept it, else `start`. */
  kept: Head;
  newLabels: string[];
  train: number[];
  val: number[];
}

export interface GateSettings { rule: string; alpha: number; max_forget: number | null; folds: number }

/** Gate, patience and mixing weights: options given, else the bundle's, else defaults.
 * `maxForget` (points; negative: no check): the replay check of `gate.forgetting`, only where
 * the bundle ships a replay set. */
export function gateSettings(m: Manifest, o: AdaptOptions): [GateSettings, number, number[]] {
  const d = m.adapt;
  const g = { ...GATE_DEFAULTS, ...(d.gate ?? {}) } as GateSettings;
  if (g.max_forget === undefined) g.max_forget = null;
  if (o.maxForget !== undefined) {
    if (!(o.maxForget < Infinity)) {
      throw new RunnerError(`--max-forget must be a finite number of points, got ` +
        `${replaying.floatRepr(o.maxForget)}`);
    }
    g.max_forget = o.maxForget < 0 ? null : o.maxForget;
  }
  if (g.max_forget !== null && replaying.block(m) === null) g.max_forget = null;
  if (o.gateAlpha !== undefined) g.alpha = o.gateAlpha;
  if (o.gateRule !== undefined) g.rule = o.gateRule;
  if (!(gating.RULES as readonly string[]).includes(g.rule)) {
    throw new RunnerError(`unknown gate rule '${g.rule}'; known: ${gating.RULES.join(", ")}`);
  }
  if (!(g.alpha >= 0 && g.alpha <= 1)) {
    throw new RunnerError(`the gate's alpha must be in [0, 1], got ${g.alpha}`);
  }
  if (o.gateFolds !== undefined) g.folds = o.gateFolds;
  if (!(Number.isInteger(g.folds) && g.folds >= 1 && g.folds <= 20)) {
    throw new RunnerError(`the gate's folds must be an integer from 1 to 20, got ${g.folds}`);
  }
  const patience = o.patience ?? d.patience ?? PATIENCE_DEFAULT;
  const mix = o.mix ?? d.mix ?? MIX_DEFAULT;
  if (!mix.length || mix.some((w) => !(w > 0 && w <= 1))) {
    throw new RunnerError(`mixing weights must be in (0, 1], got ${JSON.stringify(mix)}`);
  }
  return [g, Math.trunc(patience), mix.map(Number)];
}

function classBalancedWeights(y: number[]): Float32Array {
  const counts = new Map<number, number>();
  for (const c of y) counts.set(c, (counts.get(c) ?? 0) + 1);
  const k = counts.size;
  return Float32Array.from(y, (c) => y.length / (k * (counts.get(c) as number)));
}

/**
 * Fine-tune the head on `ds`. Returns the report, the head to write and the starting head;
 * writing files is the caller's (the CLI writes `head.npz` / `report.json` as the Python
 * runner does).
 */
export async function adapt(bundle: Bundle, backend: Backend, ds: Dataset,
  o: AdaptOptions = {}): Promise<AdaptResult> {
  const tStart = o.startedAt !== undefined ? o.startedAt / 1000 : now();
  const m = bundle.manifest;
  const warnings: string[] = [];
  const d = m.adapt;
  const epochs = o.epochs ?? d.epochs;
  const batchSize = o.batchSize ?? d.batch_size;
  const valFraction = o.valFraction ?? d.val_fraction;
  if (!(epochs >= 0 && batchSize >= 1 && valFraction > 0 && valFraction < 1)) {
    throw new RunnerError(`need epochs >= 0, batch_size >= 1, 0 < val_fraction < 1; got ` +
      `${epochs}, ${batchSize}, ${valFraction}`);
  }
  const [gate, patience, mix] = gateSettings(m, o);
  const classBalanced = o.classBalanced ?? Boolean(m.adapt.class_balanced);
  const freezeAbsent = o.freezeAbsent ?? Boolean(m.adapt.freeze_absent);
  const replayWeight = replaying.settings(m, o.replayWeight);
  const seed = o.seed ?? 0;
  const selftestErr = o.skipSelftest ? null : await selftest(bundle, backend);
  if (!ds.y) {
    throw new RunnerError(`${ds.source} has no labels (npz key 'y' or csv column 'label'); ` +
      "adaptation needs labelled data");
  }
  const ys = ds.y;
  if (new Set(ys).size < 2) {
    throw new RunnerError(`${ds.source}: every window is labelled '${ys[0]}'; adapting a ` +
      "classifier needs windows of at least 2 labels (nothing was written)");
  }
  const skipped = ds.skipped ?? [];
  if (skipped.length) {
    warnings.push(`skipped ${skipped.length} unreadable file(s), e.g. ${skipped[0].path}: ` +
      skipped[0].reason);
  }
  const t0 = now();
  const dim = m.features.dim;
  const feats = await backend.features(preprocess(ds.x, m), ds.n, ds.inner);
  const featureSeconds = now() - t0;

  const head0 = o.head ? o.head.copy() : await Head.fromBundle(bundle);
  const seen = [...new Set(ys)];
  const newLabels = seen.filter((l) => !head0.labels.includes(l));
  const missing = head0.labels.filter((l) => !seen.includes(l));
  const dynamic = m.train_step.dynamic_classes;
  const cls = m.head.class_params;
  if (newLabels.length && !dynamic && head0.labels.length + newLabels.length > head0.rows(cls)) {
    throw new RunnerError(`labels ${JSON.stringify(newLabels)} are not in this bundle's head ` +
      `${JSON.stringify(head0.labels)}, and its ${m.target} graphs have a fixed number of class ` +
      `rows (${head0.rows(cls)}, ${head0.labels.length} in use); drop those windows, export with ` +
      `a larger export.class_capacity, or ${m.trainable ? "export with --target onnx " +
        "--trainable head" : "use an onnx bundle"} (dynamic classes)`);
  }
  // class ids in the order the head will have them (new labels appended by imprinting)
  const names = [...head0.labels, ...newLabels];
  const y = ys.map((l) => names.indexOf(l));
  const splits = stratifiedFolds(y, valFraction, seed, splitMode(m),
    epochs && gate.rule !== "none" ? gate.folds : 1);
  const [tr, va] = splits[0];
  // What a run writes when it trains nothing or the gate keeps the starting head: the same
  // imprinting from every window (no validation left to protect). null: `start`.
  let startFull: Head | null = null;
  const emb = newLabels.length ? (await inferHead(backend, m, head0, feats, ds.n)).embedding : null;
  /** The starting head with the new labels imprinted from the windows `idx`. */
  const imprinted = (idx: readonly number[]): Head => {
    const h = head0.copy();
    if (emb === null) return h;
    const e = emb.dims[1];
    const byLabel = new Map<string, Float32Array[]>();
    for (const n of newLabels) byLabel.set(n, []);
    idx.forEach((k) => byLabel.get(ys[k])?.push(emb.data.subarray(k * e, (k + 1) * e)));
    h.addClasses(newLabels, byLabel, cls, dynamic, m.head.kind === "cosine");
    return h;
  };
  let start = head0;
  if (newLabels.length) { // from the training windows only: validation stays unseen
    startFull = imprinted(ys.map((_, k) => k));
    start = imprinted(tr);
    warnings.push(`labels ${pyList(newLabels)} are new to this head: added ${newLabels.length} ` +
      "class(es) by weight imprinting from their mean features (training windows while the " +
      "gate judges, every window in a head written without training)");
  }
  if (missing.length) {
    warnings.push(`local data has no windows of ${pyList(missing)}; the head keeps them but ` +
      "cannot check them");
  }
  if (!va.length) {
    throw new RunnerError(`${ds.source}: too few windows (${y.length}) for a validation split; ` +
      "collect at least 2 windows per label");
  }
  const few = [...new Set(y)].sort((a, b) => a - b)
    .filter((c) => y.filter((v) => v === c).length < 3).map((c) => start.labels[c]);
  if (few.length) warnings.push(`labels ${pyList(few)} have fewer than 3 windows; their accuracy is noisy`);

  const hp: Record<string, number> = { ...m.optimizer.hparams };
  if (o.lr !== undefined) hp.lr = o.lr;
  const ts = m.train_step;
  if (o.l2sp !== undefined) {
    if (!ts.hparam_inputs.includes("l2sp")) {
      throw new RunnerError("--l2sp needs a bundle exported with head.l2sp > 0 (its train step " +
        "takes the anchor inputs); this one has none");
    }
    if (!(o.l2sp >= 0)) throw new RunnerError(`--l2sp must be >= 0, got ${o.l2sp}`);
    hp.l2sp = o.l2sp;
  }
  if (o.backboneLrScale !== undefined) {
    if (!ts.hparam_inputs.includes("backbone_lr_scale")) {
      throw new RunnerError("--backbone-lr-scale needs a bundle that trains backbone tensors " +
        "(exported with --trainable bias, last:N, all or globs); this one trains the head only: use --lr");
    }
    if (!(o.backboneLrScale > 0)) throw new RunnerError(`--backbone-lr-scale must be > 0, got ${o.backboneLrScale}`);
    hp.backbone_lr_scale = o.backboneLrScale;
  }
  const absent = missing.map((l) => start.labels.indexOf(l));
  const frozenRows = freezeAbsent && absent.length ? [...cls] : [];
  let replaySet: replaying.ReplaySet | null = null;
  let replayInfo: Record<string, number> | null = null;
  if (replaying.block(m) !== null) { // scored for the report even when not trained on
    replaySet = await replaying.load(bundle, names, dim);
    replayInfo = { weight: replayWeight, windows: replaySet.y.length };
  }
  // What the epochs draw batches from: the local training windows, and the replay set
  const poolOf = (idx: number[]) => trainingPool(feats, y, idx, classBalanced,
    replayWeight > 0 ? replaySet : null, replayWeight);
  const nCls = start.rows(cls);
  const fixed = ts.batch_size;
  const bs = fixed ? fixed : batchSize;
  if (fixed && batchSize !== bs) {
    warnings.push(`this ${m.target} bundle trains with a fixed batch of ${bs}; --batch-size ` +
      `${batchSize} was ignored`);
  }
  const overBudget = (epoch: number): string | null =>
    o.maxSeconds !== undefined && now() - tStart > o.maxSeconds
      ? `time budget of ${o.maxSeconds} s reached in epoch ${epoch + 1}` : null;
  // the fused graph keeps the one-step path's results; frozen rows or a time budget need a
  // check after every step, so they keep one step per call (as the Python runner)
  const fuse = !frozenRows.length && o.maxSeconds === undefined;
  const settings = (s0: Head, j: number): FitSettings => ({
    hp, anchors: anchorsOf(m, s0.params), epochs, patience, bs, fixed: Boolean(fixed), nCls,
    seed: seed + j, fuse, run: j === 0, // the evidence folds: per epoch, as the Python runner
    afterStep: (h: Head, epoch: number) => {
      for (const name of frozenRows) { // absent labels keep their starting rows
        const p = h.params.get(name) as F32;
        const p0 = s0.params.get(name) as F32;
        const len = p.dims.slice(1).reduce((a, b) => a * b, 1);
        for (const a of absent) p.data.set(p0.data.subarray(a * len, (a + 1) * len), a * len);
      }
      return overBudget(epoch);
    },
  });
  const featsVa = gather(feats, dim, va);
  const yVa = va.map((i) => y[i]);
  const t1 = now();
  const run = await fit(backend, m, start, poolOf(tr), featsVa, yVa,
    { ...settings(start, 0), onEpoch: o.onEpoch });
  const { history, stopped, early, best } = run;
  let steps = run.steps;
  const head = run.head;
  const trainSeconds = now() - t1;
  if (stopped && best) {
    warnings.push(`stopped early: ${stopped}; kept the best head so far (epoch ${best.epoch}, ` +
      `validation loss ${gating.pyFormat(best.loss, 4, "f")})`);
  }
  let cand: Head;
  let verdict: gating.Verdict;
  if (epochs === 0) {
    [cand, verdict] = await chooseHead(backend, m, start, start, featsVa, yVa, [1.0],
      { rule: "none", alpha: gate.alpha });
    verdict.reason = "no training (--epochs 0): the starting head is written";
    if (startFull !== null) cand = startFull;
  } else {
    const proposal = await propose(backend, m, start, head, featsVa, yVa, mix);
    cand = proposal.cand;
    verdict = verdictOf(proposal, gate);
    if (splits.length > 1) { // more evidence: the other folds, each its own training run
      const pairs: [boolean[], boolean[]][] = [];
      let why = stopped;
      for (let j = 1; j < splits.length && !why; j++) {
        const [trJ, vaJ] = splits[j];
        if (!vaJ.length) continue;
        const startJ = imprinted(trJ);
        const fJ = gather(feats, dim, vaJ);
        const yJ = vaJ.map((i) => y[i]);
        const r = await fit(backend, m, startJ, poolOf(trJ), fJ, yJ, settings(startJ, j));
        why = r.stopped;
        const p = await propose(backend, m, startJ, r.head, fJ, yJ, mix);
        pairs.push([p.s0.right, p.s.right]);
      }
      if (why) {
        warnings.push(`the gate's evidence folds were cut short (${why}); it judged the run's ` +
          "own validation split only");
      } else {
        const first: [boolean[], boolean[]] = [proposal.s0.right, proposal.s.right];
        verdict = { ...verdict, ...pooledVerdict([first, ...pairs], gate) };
      }
    }
  }
  Object.assign(verdict, { best_epoch: best ? best.epoch : 0, early_stop: early });
  head.params = cand.params;
  if (replaySet !== null && replayInfo !== null) { // the server's windows of the labels trained on
    const present = new Set(y);
    const local = replaySet.y.flatMap((c, i) => (present.has(c) ? [i] : []));
    replayInfo.scored = local.length;
    if (local.length) {
      const fR = gather(replaySet.features, dim, local);
      const yR = local.map((i) => (replaySet as replaying.ReplaySet).y[i]);
      replayInfo.accuracy_start = (await valScores(backend, m, start, fR, yR)).acc;
      replayInfo.accuracy_proposed = (await valScores(backend, m, head, fR, yR)).acc;
      if (epochs) {
        verdict = gating.forgetting(verdict, replayInfo.accuracy_start,
          replayInfo.accuracy_proposed, gate.max_forget);
      }
    }
  }
  const rolledBack = !verdict.keep;
  if (!rolledBack) checkFinite(head.params, "refusing to write head.npz");
  const info = ds.info ?? {};
  if (info.truncated_texts) {
    warnings.push(`${info.truncated_texts} of ${info.n_texts} texts were longer than ` +
      `${info.max_length} word pieces and were truncated`);
  }
  const report: Record<string, unknown> = {
    runner_version: RUNNER_VERSION, bundle: m.name, data: ds.source,
    backend: backend.name, backend_version: backend.version, target: m.target,
    trainer: backend.trainer, trainer_version: backend.trainerVersion,
    precision: m.precision, accuracy_before: verdict.accuracy_before,
    accuracy_after: verdict.accuracy_after, rolled_back: rolledBack, gate: verdict,
    checkpoint: null, checkpoint_written: null, n_windows: y.length, n_train: tr.length,
    n_val: va.length, epochs, batch_size: bs, steps, steps_fused: run.stepsFused,
    steps_run: run.stepsRun, optimizer: m.optimizer.name, hparams: hp,
    labels: head.labels, class_balanced: classBalanced, freeze_absent: freezeAbsent,
    replay: replayInfo, head_kind: m.head.kind,
    new_labels: newLabels, missing_labels: missing, warnings, skipped_files: skipped.length,
    skipped: skipped.slice(0, 50),
    feature_seconds: featureSeconds, features_cached: false, train_seconds: trainSeconds,
    step_ms: steps ? (1000 * trainSeconds) / steps : null, total_seconds: now() - tStart,
    peak_rss_mb: null, selftest_max_abs_err: selftestErr, history, bn_stats: null,
    stopped_early: stopped, early_stop: early, epochs_run: history.length,
    budget: { max_seconds: o.maxSeconds ?? null, max_memory_mb: null }, run_key: null,
    ...info, seed, split: { mode: splitMode(m), train: tr, val: va },
  };
  const written = startFull ?? start; // what a rollback writes when the folder has no head
  return { report, head, start: written, kept: rolledBack ? written : head, newLabels,
    train: tr, val: va };
}

/**
 * The head files `adapt` leaves in a state folder, as the Python runner writes them:
 * `head` for `head.npz` (the adapted head when the gate kept it; after a rollback the
 * starting head, or null when the folder already holds a usable head for this backbone) and
 * `rejected` for `head.rejected.npz` (the head the gate refused; null when kept or not
 * finite). `dataName`: the data file's base name.
 */
export function stateFiles(bundle: Bundle, r: AdaptResult, dataName: string,
  hasUsableHead = false): { head: Uint8Array | null; rejected: Uint8Array | null } {
  const rep = r.report;
  if (!rep.rolled_back) {
    return { head: r.head.toNpz(bundle, { accuracy_before: rep.accuracy_before,
      accuracy_after: rep.accuracy_after, data: dataName, run_key: null }), rejected: null };
  }
  const head = hasUsableHead ? null
    : r.start.toNpz(bundle, { rolled_back: true, imprinted: r.newLabels, run_key: null });
  let rejected: Uint8Array | null = null;
  try {
    rejected = r.head.toNpz(bundle, { rejected: (rep.gate as { reason: string }).reason,
      data: dataName, run_key: null });
  } catch { /* non-finite: nothing to inspect */ }
  return { head, rejected };
}

function pyList(xs: string[]): string {
  return "[" + xs.map((x) => `'${x}'`).join(", ") + "]";
}

export interface InferResult {
  n_windows: number;
  labels: string[];
  predictions: string[];
  accuracy?: number;
  per_label_accuracy?: Record<string, number>;
  seconds: number;
  [k: string]: unknown;
}

/** Predict labels for `ds`; with labels present, also accuracy. */
export async function infer(bundle: Bundle, backend: Backend, ds: Dataset,
  head?: Head): Promise<InferResult> {
  const m = bundle.manifest;
  const h = head ?? await Head.fromBundle(bundle);
  const t0 = now();
  const feats = await backend.features(preprocess(ds.x, m), ds.n, ds.inner);
  const lg = (await inferHead(backend, m, h, feats, ds.n)).logits;
  const stride = lg.dims[1];
  const k = h.labels.length;
  const pred: string[] = [];
  for (let i = 0; i < ds.n; i++) {
    let best = 0;
    for (let c = 1; c < k; c++) if (lg.data[i * stride + c] > lg.data[i * stride + best]) best = c;
    pred.push(h.labels[best]);
  }
  const res: InferResult = { n_windows: pred.length, head: head ? "given" : "bundle",
    labels: h.labels, bn_stats: null, skipped_files: (ds.skipped ?? []).length, ...(ds.info ?? {}), predictions: pred,
    seconds: now() - t0 };
  if (ds.y) {
    const y = ds.y;
    const acc = (idx: number[]) => idx.filter((i) => pred[i] === y[i]).length / idx.length;
    res.accuracy = acc(pred.map((_, i) => i));
    res.per_label_accuracy = {};
    for (const lab of new Set(y)) {
      res.per_label_accuracy[lab] = acc(y.flatMap((v, i) => (v === lab ? [i] : [])));
    }
  }
  return res;
}
