/**
 * The adaptation gate, as `edgerun/gate.py`: the adapted head replaces the current one only
 * when `fixed > broke` and the one-sided exact McNemar p-value `P(X >= fixed)`,
 * `X ~ Bin(fixed + broke, 1/2)`, is `<= alpha`.
 */
import { exp, log } from "./crmath.js";

export const RULES = ["mcnemar", "none"] as const;

// CPython's math.lgamma (Modules/mathmodule.c, m_lgamma: Lanczos, g = 6.0246...), ported
// operation for operation so that p-values, and the reasons that print them, match the
// Python runner's.
const LANCZOS_G = 6.024680040776729583740234375;
const NUM = [23531376880.410759688572007674451636754734846804940,
  42919803642.649098768957899047001988850926355848959,
  35711959237.355668049440185451547166705960488635843,
  17921034426.037209699919755754458931112671403265390,
  6039542586.3520280050642916443072979210699388420708,
  1439720407.3117216736632230727949123939715485786772,
  248874557.86205415651146038641322942321632125127801,
  31426415.585400194380614231628318205362874684987640,
  2876370.6289353724412254090516208496135991145378768,
  186056.26539522349504029498971604569928220784236328,
  8071.6720023658162106380029022722506138218516325024,
  210.82427775157934587250973392071336271166969580291,
  2.5066282746310002701649081771338373386264310793408];
const DEN = [0.0, 39916800.0, 120543840.0, 150917976.0, 105258076.0, 45995730.0, 13339535.0,
  2637558.0, 357423.0, 32670.0, 1925.0, 66.0, 1.0];

function lanczosSum(x: number): number {
  let num = 0;
  let den = 0;
  if (x < 5.0) {
    for (let i = NUM.length - 1; i >= 0; i--) { num = num * x + NUM[i]; den = den * x + DEN[i]; }
  } else {
    for (let i = 0; i < NUM.length; i++) { num = num / x + NUM[i]; den = den / x + DEN[i]; }
  }
  return num / den;
}

/** `math.lgamma` for x > 0 (the binomial tail needs no more). */
export function lgamma(x: number): number {
  if (x === Math.floor(x) && x <= 2.0) return 0.0;
  if (x < 1e-20) return -log(x);
  let r = log(lanczosSum(x)) - LANCZOS_G;
  r += (x - 0.5) * (log(x + LANCZOS_G - 0.5) - 1);
  return r;
}

/**
 * Python's `format(x, f".{p}g")` / `f".{p}f"`: rounding half to even on the double's exact
 * decimal value (JavaScript's toPrecision/toFixed round exact ties up).
 */
export function pyFormat(x: number, p: number, kind: "g" | "f"): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  const neg = x < 0 || Object.is(x, -0);
  const [m, e] = Math.abs(x).toExponential(100).split("e");
  const digits = m.replace(".", "");
  let exp = Number(e);
  // keep `keep` significant digits, half to even
  const round = (keep: number): string => {
    if (keep < 0) return "";
    const head = digits.slice(0, keep);
    const tail = digits.slice(keep);
    let up = tail[0] > "5" || (tail[0] === "5" && /[1-9]/.test(tail.slice(1)));
    if (tail[0] === "5" && !/[1-9]/.test(tail.slice(1))) {
      up = keep > 0 && Number(head[keep - 1]) % 2 === 1;
    }
    if (!up) return head || "0";
    const n = (BigInt(head || "0") + 1n).toString();
    return n;
  };
  let out: string;
  if (kind === "f") {
    const keep = exp + 1 + p; // digits before the point + p decimals
    let r = keep <= 0 ? (keep === 0 && round(0) === "1" ? "1" : "0") : round(keep);
    r = r.padStart(p + 1, "0");
    out = p ? `${r.slice(0, r.length - p)}.${r.slice(r.length - p)}` : r;
  } else {
    const q = p === 0 ? 1 : p;
    if (Math.abs(x) === 0) return neg ? "-0" : "0";
    let r = round(q);
    if (r.length > q) { exp += 1; r = r.slice(0, q); }
    if (exp < -4 || exp >= q) {
      const mant = (r[0] + (r.length > 1 ? "." + r.slice(1) : "")).replace(/\.?0+$/, "");
      out = `${mant}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
    } else if (exp >= 0) {
      const int = r.slice(0, exp + 1).padEnd(exp + 1, "0");
      const frac = r.slice(exp + 1).replace(/0+$/, "");
      out = frac ? `${int}.${frac}` : int;
    } else {
      const frac = ("0".repeat(-exp - 1) + r).replace(/0+$/, "");
      out = `0.${frac}`;
    }
  }
  return neg ? `-${out}` : out;
}

/** `P(X >= k)` for `X ~ Bin(n, 1/2)`, summed in log space. */
export function binomialTail(k: number, n: number): number {
  if (k <= 0) return 1;
  if (k > n) return 0;
  const logs: number[] = [];
  for (let i = k; i <= n; i++) {
    logs.push(lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) - n * log(2));
  }
  const top = Math.max(...logs);
  return Math.min(1, exp(top) * logs.reduce((s, v) => s + exp(v - top), 0));
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
      `(one-sided exact McNemar p = ${pyFormat(p, 3, "g")} > alpha ${pyFormat(alpha, 6, "g")}); the current head stays` };
  }
  return { ...out, keep: true, reason: `better: fixes ${fixed}, breaks ${broke} (one-sided ` +
    `exact McNemar p = ${pyFormat(p, 3, "g")} <= alpha ${pyFormat(alpha, 6, "g")})` };
}

/** Mean cross-entropy of logits `[n, k]` (row stride `stride`, first `k` columns). */
export function softmaxXent(logits: Float32Array, n: number, stride: number, k: number,
  y: readonly number[]): number {
  // indexed loops, no subarrays or iterators: a cold process runs this interpreted once per
  // epoch (an adapt of 30 epochs spent 7-23 ms here with `for...of` over row views)
  let total = 0;
  for (let i = 0; i < n; i++) {
    const o = i * stride;
    let mx = -Infinity;
    for (let c = 0; c < k; c++) mx = Math.max(mx, logits[o + c]);
    let s = 0;
    for (let c = 0; c < k; c++) s += Math.exp(logits[o + c] - mx);
    total += Math.log(s) - (logits[o + y[i]] - mx);
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

/**
 * `verdict` with the replay check: a head that forgets the server's data is refused.
 *
 * `before`/`after`: accuracy of the current and the adapted head on the bundle's replay
 * windows (server-training data, `replay.ts`). A head the test kept is refused when it loses
 * more than `maxForget` points there (null: no check).
 */
export function forgetting(verdict: Verdict, before: number, after: number,
  maxForget: number | null): Verdict {
  const drop = 100.0 * (before - after);
  const out: Verdict = { ...verdict, replay_before: before, replay_after: after,
    max_forget: maxForget };
  if (maxForget === null || !verdict.keep || verdict.rule === "none") return out;
  if (drop > maxForget) {
    const d = pyFormat(-drop, 1, "f");
    return { ...out, keep: false, reason: `forgets the server's data: ${verdict.reason}, but ` +
      `replay accuracy ${pyFormat(before, 3, "f")} -> ${pyFormat(after, 3, "f")} ` +
      `(${d.startsWith("-") ? d : "+" + d} pt, more than the ${pyFormat(maxForget, 6, "g")} pt ` +
      "allowed); the current head stays" };
  }
  return out;
}
