/**
 * exp and log rounded correctly (double-double arithmetic, ~2^-104 relative before the final
 * rounding). glibc's exp/log, which the Python runner's `math` module uses, are correctly
 * rounded in all but vanishingly rare cases; V8's fdlibm ports are not (about 10% of exp
 * results differ in the last bit), and the gate's p-value and the 3 digits its reason prints
 * must come out as the Python runner's.
 */
type DD = [number, number];

function twoSum(a: number, b: number): DD {
  const s = a + b;
  const bb = s - a;
  return [s, (a - (s - bb)) + (b - bb)];
}

function quick(a: number, b: number): DD {
  const s = a + b;
  return [s, b - (s - a)];
}

function split(a: number): DD {
  const c = 134217729 * a;
  const hi = c - (c - a);
  return [hi, a - hi];
}

function twoProd(a: number, b: number): DD {
  const p = a * b;
  const [ah, al] = split(a);
  const [bh, bl] = split(b);
  return [p, ((ah * bh - p) + ah * bl + al * bh) + al * bl];
}

function mul(a: DD, b: DD): DD {
  const [p, e] = twoProd(a[0], b[0]);
  return quick(p, e + (a[0] * b[1] + a[1] * b[0]));
}

function add(a: DD, b: DD): DD {
  const [s, e] = twoSum(a[0], b[0]);
  return quick(s, e + a[1] + b[1]);
}

function divInt(a: DD, k: number): DD {
  const q = a[0] / k;
  const [p, e] = twoProd(q, k);
  return quick(q, ((a[0] - p) - e + a[1]) / k);
}

const LN2: DD = [0.6931471805599453, 2.3190468138462996e-17];

/** exp(x) as a double-double. */
function expDD(x: number): DD {
  const k = Math.round(x / LN2[0]);
  const [p, e] = twoProd(k, LN2[0]);
  const [s, e2] = twoSum(x, -p);
  const r = quick(s, e2 - e - k * LN2[1]);
  let sum: DD = [1, 0];
  let term: DD = [1, 0];
  for (let i = 1; i < 30; i++) {
    term = divInt(mul(term, r), i);
    sum = add(sum, term);
    if (Math.abs(term[0]) < 1e-36) break;
  }
  // scale by 2^k in two exact steps (k up to ~1100)
  const h = Math.trunc(k / 2);
  const a = 2 ** h;
  const b = 2 ** (k - h);
  return [sum[0] * a * b, sum[1] * a * b];
}

/** exp(x), correctly rounded. */
export function exp(x: number): number {
  if (!Number.isFinite(x)) return Math.exp(x);
  if (x > 709.78) return Infinity;
  if (x < -745.2) return 0;
  if (x === 0) return 1;
  const [hi, lo] = expDD(x);
  return hi + lo;
}

/** log(x), correctly rounded (one Newton step on exp from Math.log's estimate). */
export function log(x: number): number {
  if (!(x > 0) || !Number.isFinite(x) || x < 1e-300 || x === 1) return Math.log(x);
  const y0 = Math.log(x);
  const e = expDD(y0); // e ~ x: y = y0 + (x - e) / e
  const [d, de] = twoSum(x, -e[0]);
  const c = (d + (de - e[1])) / x;
  const [y, ye] = twoSum(y0, c);
  return y + ye;
}
