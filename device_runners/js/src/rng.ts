/**
 * numpy's `np.random.default_rng(seed)` in TypeScript, bit for bit: `SeedSequence` (entropy
 * = the seed) -> `PCG64` (128-bit LCG, XSL-RR output) -> `Generator.permutation` (numpy's
 * Fisher-Yates: for i = n-1 .. 1, j = random_interval(i): the next 32-bit draw, masked to
 * the smallest all-ones mask >= i, redrawn while > i; 32-bit draws use both halves of a
 * 64-bit output, low half first).
 *
 * The Python runner shuffles the training windows with `rng.permutation(train)` once per
 * epoch from `default_rng(seed)`; this reproduces the same orders, so both runners take the
 * same batches (tests/test_js_runner.py checks it against numpy).
 */

const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const MULT = 0x2360ed051fc65da44385df649fccf645n;

const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const POOL = 4;

function mul32(a: number, b: number): number {
  return Math.imul(a, b) >>> 0;
}

/** numpy's SeedSequence(seed).generate_state(nWords, uint32). */
export function seedSequenceState(seed: bigint | number, nWords: number): Uint32Array {
  let n = BigInt(seed);
  if (n < 0n) throw new RangeError("seed must be >= 0");
  const entropy: number[] = [];
  if (n === 0n) entropy.push(0);
  while (n > 0n) { entropy.push(Number(n & M32)); n >>= 32n; }
  let hashConst = INIT_A;
  const hashmix = (value: number): number => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x: number, y: number): number => {
    let r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    r = (r ^ (r >>> 16)) >>> 0;
    return r;
  };
  const pool = new Array<number>(POOL).fill(0);
  for (let i = 0; i < POOL; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let s = 0; s < POOL; s++) {
    for (let d = 0; d < POOL; d++) if (s !== d) pool[d] = mix(pool[d], hashmix(pool[s]));
  }
  for (let s = POOL; s < entropy.length; s++) {
    for (let d = 0; d < POOL; d++) pool[d] = mix(pool[d], hashmix(entropy[s]));
  }
  const out = new Uint32Array(nWords);
  let hc = INIT_B;
  for (let i = 0; i < nWords; i++) {
    let v = (pool[i % POOL] ^ hc) >>> 0;
    hc = mul32(hc, MULT_B);
    v = mul32(v, hc);
    out[i] = (v ^ (v >>> 16)) >>> 0;
  }
  return out;
}

/** numpy's PCG64 bit generator (with its buffered 32-bit draws). */
export class PCG64 {
  state = 0n;
  inc = 0n;
  private hasU32 = false;
  private u32 = 0;

  constructor(seed: bigint | number) {
    const w = seedSequenceState(seed, 8);
    const u64 = (i: number) => BigInt(w[2 * i]) | (BigInt(w[2 * i + 1]) << 32n);
    const initstate = (u64(0) << 64n) | u64(1);
    const initseq = (u64(2) << 64n) | u64(3);
    this.inc = ((initseq << 1n) | 1n) & M128;
    this.state = 0n;
    this.step();
    this.state = (this.state + initstate) & M128;
    this.step();
  }

  private step(): void {
    this.state = (this.state * MULT + this.inc) & M128;
  }

  next64(): bigint {
    this.step();
    const hi = this.state >> 64n;
    const x = (hi ^ this.state) & M64;
    const rot = Number(hi >> 58n);
    return ((x >> BigInt(rot)) | (x << BigInt((64 - rot) & 63))) & M64;
  }

  next32(): number {
    if (this.hasU32) { this.hasU32 = false; return this.u32; }
    const v = this.next64();
    this.hasU32 = true;
    this.u32 = Number(v >> 32n);
    return Number(v & M32);
  }

  /** numpy's random_interval(max): uniform in [0, max] by masked rejection. */
  interval(max: number): number {
    if (max === 0) return 0;
    if (max > 0xffffffff) throw new RangeError("permutations above 2^32 items are not supported");
    let mask = max;
    mask |= mask >>> 1; mask |= mask >>> 2; mask |= mask >>> 4;
    mask |= mask >>> 8; mask |= mask >>> 16;
    mask >>>= 0;
    let v: number;
    do { v = (this.next32() & mask) >>> 0; } while (v > max);
    return v;
  }

  /** `Generator.permutation(values)` for a 1-D array: a shuffled copy. */
  permutation<T>(values: readonly T[]): T[] {
    const a = values.slice();
    for (let i = a.length - 1; i >= 1; i--) {
      const j = this.interval(i);
      const t = a[i]; a[i] = a[j]; a[j] = t;
    }
    return a;
  }
}

/** `np.random.default_rng(seed)` (permutation only). */
export function defaultRng(seed: bigint | number): PCG64 {
  return new PCG64(seed);
}
