/**
 * Text bundles: the bundle's WordPiece tokenizer (a port of `edgerun/text.py`'s pure-Python
 * `WordPiece`, BERT's uncased pipeline) and text data files (`.csv` with `text` [+ `label`],
 * or `.txt` with one text per line).
 */
import { Bundle } from "./bundle.js";
import { checkLabelText, Dataset, parseCsv } from "./data.js";
import { RunnerError } from "./errors.js";

const isWhitespace = (ch: string) => " \t\n\r".includes(ch) || /^\p{Zs}$/u.test(ch);
const isControl = (ch: string) => !"\t\n\r".includes(ch) && /^[\p{Cc}\p{Cf}\p{Cn}\p{Co}]$/u.test(ch);

function isPunctuation(ch: string): boolean {
  const cp = ch.codePointAt(0) as number;
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
    (cp >= 123 && cp <= 126)) return true;
  return /^\p{P}$/u.test(ch);
}

function isCjk(cp: number): boolean {
  return (cp >= 0x4e00 && cp <= 0x9fff) || (cp >= 0x3400 && cp <= 0x4dbf) ||
    (cp >= 0x20000 && cp <= 0x2a6df) || (cp >= 0x2a700 && cp <= 0x2b73f) ||
    (cp >= 0x2b740 && cp <= 0x2b81f) || (cp >= 0x2b820 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0x2f800 && cp <= 0x2fa1f);
}

/** BERT's uncased WordPiece tokenizer (ids without special tokens). */
export class WordPiece {
  readonly name = "edgerun-js WordPiece";
  private readonly vocab = new Map<string, number>();
  private readonly unkId: number;

  constructor(vocab: string[], private readonly lowercase = true, unk = "[UNK]",
    private readonly prefix = "##", private readonly maxChars = 100) {
    // as Python's dict comprehension: a duplicate token keeps its last index
    vocab.forEach((t, i) => this.vocab.set(t, i));
    const u = this.vocab.get(unk);
    if (u === undefined) throw new RunnerError(`the tokenizer vocabulary has no unknown token '${unk}'`);
    this.unkId = u;
  }

  private normalize(text: string): string {
    let out = "";
    for (const ch of text) {
      const cp = ch.codePointAt(0) as number;
      if (cp === 0 || cp === 0xfffd || isControl(ch)) continue;
      if (isWhitespace(ch)) out += " ";
      else if (isCjk(cp)) out += ` ${ch} `;
      else out += ch;
    }
    if (this.lowercase) {
      out = out.toLowerCase().normalize("NFD").replace(/\p{Mn}/gu, "");
    }
    return out;
  }

  private split(text: string): string[] {
    const words: string[] = [];
    for (const chunk of text.split(/\s+/u)) {
      let cur = "";
      for (const ch of chunk) {
        if (isPunctuation(ch)) {
          if (cur) { words.push(cur); cur = ""; }
          words.push(ch);
        } else cur += ch;
      }
      if (cur) words.push(cur);
    }
    return words;
  }

  private word(word: string): number[] {
    const cps = Array.from(word);
    if (cps.length > this.maxChars) return [this.unkId];
    const ids: number[] = [];
    let start = 0;
    while (start < cps.length) {
      let end = cps.length;
      let found: number | undefined;
      while (start < end) {
        const sub = cps.slice(start, end).join("");
        found = this.vocab.get(start === 0 ? sub : this.prefix + sub);
        if (found !== undefined) break;
        end -= 1;
      }
      if (found === undefined) return [this.unkId];
      ids.push(found);
      start = end;
    }
    return ids;
  }

  encode(text: string): number[] {
    return this.split(this.normalize(text)).flatMap((w) => this.word(w));
  }
}

/** `[CLS] ids [SEP]` per text, right-padded: `(N, 2, L)` ids + mask, and the truncated count. */
export function pack(pieces: number[][], maxLength: number, cls: number, sep: number,
  pad: number): { x: BigInt64Array; truncated: number } {
  const x = new BigInt64Array(pieces.length * 2 * maxLength);
  const room = maxLength - 2;
  let truncated = 0;
  pieces.forEach((ids0, i) => {
    let ids = ids0;
    if (ids.length > room) { truncated++; ids = ids.slice(0, room); }
    const row = [cls, ...ids, sep];
    const base = i * 2 * maxLength;
    for (let k = 0; k < maxLength; k++) {
      x[base + k] = BigInt(k < row.length ? row[k] : pad);
      x[base + maxLength + k] = k < row.length ? 1n : 0n;
    }
  });
  return { x, truncated };
}

/** Texts -> the backbone's `(N, 2, max_length)` int64 input, as the manifest says. */
export class TextEncoder_ {
  readonly maxLength: number;
  readonly name: string;
  private readonly wp: WordPiece;
  private readonly ids: [number, number, number];

  constructor(bundle: Bundle) {
    const spec = (bundle.manifest.input.text ?? {}) as Record<string, unknown>;
    this.maxLength = Number(spec.max_length);
    this.ids = [Number(spec.cls_id), Number(spec.sep_id), Number(spec.pad_id)];
    if (!(this.maxLength >= 2) || this.ids.some((v) => !Number.isInteger(v))) {
      throw new RunnerError("manifest input.text needs max_length, cls_id, sep_id and pad_id; " +
        "re-export the bundle");
    }
    const vocab = new TextDecoder().decode(bundle.file(String(spec.vocab))).split(/\r\n|\r|\n/);
    if (vocab.length && vocab[vocab.length - 1] === "") vocab.pop();
    this.wp = new WordPiece(vocab, spec.lowercase === undefined ? true : Boolean(spec.lowercase),
      typeof spec.unk_token === "string" ? spec.unk_token : "[UNK]");
    this.name = this.wp.name;
  }

  encode(texts: string[]): { x: BigInt64Array; truncated: number } {
    return pack(texts.map((t) => this.wp.encode(t)), this.maxLength, ...this.ids);
  }
}

/** Texts and optional labels of a `.csv` (`text` [, `label`]) or `.txt` file's content. */
export function readTexts(content: string, source: string): { texts: string[]; labels: string[] | null } {
  if (content.charCodeAt(0) === 0xfeff) content = content.slice(1);
  const ext = (/\.[^./\\]*$/.exec(source)?.[0] ?? "").toLowerCase();
  if (ext === ".txt") {
    return { texts: content.split(/\r\n|\r|\n/).map((s) => s.trim()).filter((s) => s), labels: null };
  }
  if (ext !== ".csv") {
    throw new RunnerError(`${source}: this bundle takes text: a .csv with a 'text' column ` +
      `(and 'label' to adapt) or a .txt with one text per line, not '${ext || "(no extension)"}'`);
  }
  const rows = parseCsv(content).filter((r) => r.length > 0); // DictReader skips blank rows
  const cols = rows[0] ?? [];
  const ti = cols.indexOf("text");
  if (ti < 0) {
    throw new RunnerError(`${source}: expected a header with a 'text' column (and 'label' to ` +
      `adapt), found ${JSON.stringify(cols)}`);
  }
  const li = cols.indexOf("label");
  const texts: string[] = [];
  const labels: string[] = [];
  for (const r of rows.slice(1)) {
    texts.push(r[ti] ?? "");
    labels.push(li >= 0 ? (r[li] ?? "").trim() : "");
  }
  if (li < 0) return { texts, labels: null };
  checkLabelText(source, labels);
  const bad = labels.flatMap((l, i) => (l ? [] : [i + 2])).slice(0, 5);
  if (bad.length) {
    throw new RunnerError(`${source}: empty labels on line(s) ${JSON.stringify(bad)}; every row ` +
      "needs a label");
  }
  return { texts, labels };
}

/** A text data file's content as a dataset of `(N, 2, max_length)` token ids + masks. */
export function loadTexts(content: string, bundle: Bundle, source: string): Dataset {
  const { texts, labels } = readTexts(content, source);
  if (!texts.length) throw new RunnerError(`${source} holds no texts`);
  const enc = new TextEncoder_(bundle);
  const { x, truncated } = enc.encode(texts);
  return { x, n: texts.length, inner: [2, enc.maxLength], y: labels, source,
    info: { tokenizer: enc.name, n_texts: texts.length, truncated_texts: truncated,
      max_length: enc.maxLength } };
}
