/**
 * The adaptation gate, as `edgerun/gate.py`: the adapted head replaces the current one only
 * when `fixed > broke` and the one-sided exact McNemar p-value `P(X >= fixed)`,
 * `X ~ Bin(fixed + broke, 1/2)`, is `<= alpha`.
 */
export const RULES = ["mcnemar", "none"] as const;

// Lanczos approximation (g = 7, n = 9): |error| ~ 1e-15 relative.
const LG = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
  -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6,
  1.5056327351493116e-7];

export function lgamma(x: number): number {
  if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - lgamma(1 - x);
  x -= 1;
  let a = LG[0];
  const t = x + 7.5;
  for (let i = 1; i < 9; i++) a += LG[i] / (x + i);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}

/** `P(X >= k)` for `X ~ Bin(n, 1/2)`, summed in log space. */
export function binomialTail(k: number, n: number): number {
  if (k <= 0) return 1;
  if (k > n) return 0;
  const logs: number[] = [];
  for (let i = k; i <= n; i++) {
    logs.push(lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) - n * Math.log(2));
  }
  const top = Math.max(...logs);
  return Math.min(1, Math.exp(top) * logs.reduce((s, v) => s + Math.exp(v - top), 0));
}

export interface Verdict {
  rule: string;
  alpha: number;
  n: number;
  fixed: number;
  broke: number;
  p_value: number;
  keep: boolean;
  reason: string;
  [extra: string]: unknown;
}

function g(x: number): string { // Python's format spec "g" (6 significant digits)
  if (x === 0) return "0";
  const e = Math.floor(Math.log10(Math.abs(x)));
  if (e < -4 || e >= 6) {
    const [m, ex] = x.toExponential(5).split("e");
    const mant = m.includes(".") ? m.replace(/\.?0+$/, "") : m;
    const n = Number(ex);
    return `${mant}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
  }
  return String(Number(x.toPrecision(6)));
}

/** Python's `{p:.3g}`. */
function g3(x: number): string {
  if (x === 0) return "0";
  const e = Math.floor(Math.log10(Math.abs(x)));
  if (e < -4 || e >= 3) {
    const [m, ex] = x.toExponential(2).split("e");
    const mant = m.includes(".") ? m.replace(/\.?0+$/, "") : m;
    const n = Number(ex);
    return `${mant}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
  }
  return String(Number(x.toPrecision(3)));
}

/** Whether the adapted head replaces the current one, and why (`report.json["gate"]`). */
export function decide(currentOk: readonly boolean[], adaptedOk: readonly boolean[],
  alpha: number, rule = "mcnemar"): Verdict {
  if (!(RULES as readonly string[]).includes(rule)) {
    throw new Error(`unknown gate rule '${rule}'; known: ${RULES.join(", ")}`);
  }
  if (currentOk.length !== adaptedOk.length) {
    throw new Error("paired predictions must be two arrays of one length");
  }
  let fixed = 0;
  let broke = 0;
  currentOk.forEach((c, i) => {
    if (adaptedOk[i] && !c) fixed++;
    if (c && !adaptedOk[i]) broke++;
  });
  const p = binomialTail(fixed, fixed + broke);
  const n = currentOk.length;
  const out = { rule, alpha, n, fixed, broke, p_value: p };
  if (rule === "none") return { ...out, keep: true, reason: "gate disabled: the adapted head is kept" };
  if (fixed + broke === 0) {
    return { ...out, keep: false, reason: `tie: both heads agree on all ${n} validation ` +
      "windows; nothing to gain, the current head stays" };
  }
  if (fixed <= broke) {
    return { ...out, keep: false, reason: `no better: the adapted head fixes ${fixed} and ` +
      `breaks ${broke} validation windows; the current head stays` };
  }
  if (p > alpha) {
    return { ...out, keep: false, reason: `not significant: fixes ${fixed}, breaks ${broke} ` +
      `(one-sided exact McNemar p = ${g3(p)} > alpha ${g(alpha)}); the current head stays` };
  }
  return { ...out, keep: true, reason: `better: fixes ${fixed}, breaks ${broke} (one-sided ` +
    `exact McNemar p = ${g3(p)} <= alpha ${g(alpha)})` };
}

/** Mean cross-entropy of logits `[n, k]` (row stride `stride`, first `k` columns). */
export function softmaxXent(logits: Float32Array, n: number, stride: number, k: number,
  y: readonly number[]): number {
  let total = 0;
  for (let i = 0; i < n; i++) {
    const row = logits.subarray(i * stride, i * stride + k);
    let mx = -Infinity;
    for (const v of row) mx = Math.max(mx, v);
    let s = 0;
    for (const v of row) s += Math.exp(v - mx);
    total += Math.log(s) - (row[y[i]] - mx);
  }
  return total / n;
}

/** WiSE-FT: `start + w * (adapted - start)` in float32, as numpy computes it. */
export function mix(start: Float32Array, adapted: Float32Array, w: number): Float32Array {
  const fw = Math.fround(w);
  const out = new Float32Array(start.length);
  for (let i = 0; i < out.length; i++) {
    out[i] = start[i] + Math.fround(fw * Math.fround(adapted[i] - start[i]));
  }
  return out;
}
