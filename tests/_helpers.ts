/** Shared helpers of the test suite: temp dirs, images, seeded randomness, a fake clock. */
import * as fs from "node:fs";

/** A temp dir removed after `body` runs. */
export async function withTempDir<T>(body: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "sectorlog-test-" });
  try {
    return await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes a file of `sizeBytes` whose content comes from `fill` (default: sparse zeroes). */
export async function makeImage(
  path: string,
  sizeBytes: number,
  fill?: (bytes: Uint8Array) => void,
): Promise<Uint8Array> {
  const bytes = new Uint8Array(sizeBytes);
  fill?.(bytes);
  await Deno.writeFile(path, bytes);
  return bytes;
}

/**
 * Reads a whole file. Returns a plain Uint8Array, not Node's Buffer, whose `slice()` is a view
 * rather than a copy and would silently alias models taken with `.slice()`.
 */
export function readAll(path: string): Uint8Array {
  const buffer = fs.readFileSync(path);
  return new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
}

/** A small seeded PRNG (mulberry32), so property tests replay from their printed seed. */
export class Random {
  #state: number;
  readonly seed: number;
  constructor(seed: number) {
    this.seed = seed >>> 0;
    this.#state = this.seed;
  }
  /** Uniform float in [0, 1). */
  next(): number {
    let t = (this.#state = (this.#state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Uniform integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }
  /** Fills `bytes` with pseudo-random bytes. */
  fill(bytes: Uint8Array): void {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(this.next() * 256);
  }
}

/** The seed for a property test: SECTORLOG_SEED if set, else random; printed on failure. */
export function testSeed(): number {
  const fromEnv = Deno.env.get("SECTORLOG_SEED");
  return fromEnv !== undefined ? Number(fromEnv) : Math.floor(Math.random() * 2 ** 31);
}

/** Runs `body` with a seed, rethrowing failures with the seed in the message. */
export async function withSeed(body: (random: Random) => Promise<void>): Promise<void> {
  const seed = testSeed();
  try {
    await body(new Random(seed));
  } catch (error) {
    (error as Error).message = `[replay with SECTORLOG_SEED=${seed}] ${(error as Error).message}`;
    throw error;
  }
}

/** A manual clock in µs for the library's `clock` options. */
export class FakeClock {
  nowUs: number;
  constructor(startUs = 1_764_000_000_000_000) {
    this.nowUs = startUs;
  }
  /** Moves the clock forward by `us` and returns the new time. */
  advance(us: number): number {
    this.nowUs += us;
    return this.nowUs;
  }
  /** The clock as a function. */
  get fn(): () => number {
    return () => this.nowUs;
  }
}

/** True when `a` and `b` are byte-equal; otherwise throws naming the first differing offset. */
export function assertBytesEqual(actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length !== expected.length) {
    throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  }
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      throw new Error(`${what}: first difference at offset ${i} (${actual[i]} vs ${expected[i]})`);
    }
  }
}

/** Every file under `dir` (recursively) by relative path, with its bytes. */
export async function readTree(dir: string): Promise<Map<string, Uint8Array>> {
  const files = new Map<string, Uint8Array>();
  async function visit(relative: string): Promise<void> {
    for await (const item of Deno.readDir(relative === "" ? dir : `${dir}/${relative}`)) {
      const path = relative === "" ? item.name : `${relative}/${item.name}`;
      if (item.isDirectory) await visit(path);
      else files.set(path, readAll(`${dir}/${path}`));
    }
  }
  await visit("");
  return files;
}

/** Throws naming the first file under `dir` that was added, removed or changed since `before`. */
export async function assertTreeUnchanged(
  dir: string,
  before: Map<string, Uint8Array>,
  what: string,
): Promise<void> {
  const after = await readTree(dir);
  const names = [...new Set([...before.keys(), ...after.keys()])].sort();
  for (const name of names) {
    const old = before.get(name);
    const now = after.get(name);
    if (old === undefined) throw new Error(`${what}: ${name} was created`);
    if (now === undefined) throw new Error(`${what}: ${name} was removed`);
    assertBytesEqual(now, old, `${what}: ${name}`);
  }
}
