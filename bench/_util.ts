/**
 * Helpers shared by the benchmarks (private to `bench/`): running commands, timing, dropping the
 * page cache, sampling a process's memory, machine facts and table printing.
 *
 * @module
 */
import { LogAssistedDisk } from "../lib/disk.ts";

/** Repository root: benchmarks run the real CLI from here, as a user would. */
export const REPO_ROOT: string = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
/** The CLI as a user runs it. */
export const CLI: string[] = ["deno", "run", "-A", `${REPO_ROOT}/cli/main.ts`];

/** Result of {@linkcode run}. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  wallMs: number;
}

/**
 * Runs a command to completion and returns its output and wall time; throws on failure. `env`
 * adds to (or overrides) the inherited environment.
 */
export async function run(
  argv: string[],
  options: { allowFailure?: boolean; cwd?: string; env?: Record<string, string> } = {},
): Promise<RunResult> {
  const startedMs = performance.now();
  const output = await new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: options.cwd ?? REPO_ROOT,
    env: options.env,
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).output();
  const wallMs = performance.now() - startedMs;
  const result = {
    code: output.code,
    stdout: new TextDecoder().decode(output.stdout),
    stderr: new TextDecoder().decode(output.stderr),
    wallMs,
  };
  if (result.code !== 0 && options.allowFailure !== true) {
    throw new Error(
      `Command failed with exit code ${result.code}: ${argv.join(" ")}\n${result.stderr}`,
    );
  }
  return result;
}

/** True when the page cache can be dropped (root with a writable /proc/sys/vm/drop_caches). */
export function canDropCaches(): boolean {
  try {
    Deno.openSync("/proc/sys/vm/drop_caches", { write: true }).close();
    return true;
  } catch {
    return false;
  }
}

/** `sync; echo 3 > /proc/sys/vm/drop_caches` when allowed, else just `sync`. */
export async function syncAndDropCaches(drop: boolean): Promise<void> {
  await run(["sync"]);
  if (drop) await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3\n");
}

/** Median of a non-empty list. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** Parses `/usr/bin/time -v` output: peak RSS in bytes and elapsed wall time in ms. */
export function parseTimeVerbose(stderr: string): { maxRssBytes: number; elapsedMs: number } {
  const rss = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
  const elapsed = /Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)/.exec(stderr);
  if (rss === null || elapsed === null) {
    throw new Error(`Cannot parse /usr/bin/time -v output:\n${stderr}`);
  }
  const parts = elapsed[1].split(":").map(Number);
  const seconds = parts.reduce((total, part) => total * 60 + part, 0);
  return { maxRssBytes: Number(rss[1]) * 1024, elapsedMs: seconds * 1000 };
}

/** Peak and latest memory of a running process, sampled from /proc/<pid>/status. */
export class RssSampler {
  readonly pid: number;
  maxRssBytes = 0;
  hwmBytes = 0;
  samples = 0;
  #timer: ReturnType<typeof setInterval>;

  constructor(pid: number, intervalMs = 100) {
    this.pid = pid;
    this.#timer = setInterval(() => this.sample(), intervalMs);
  }

  /** Reads VmRSS and VmHWM once; silently ignores a process that has exited. */
  sample(): void {
    let status: string;
    try {
      status = Deno.readTextFileSync(`/proc/${this.pid}/status`);
    } catch {
      return;
    }
    const rss = /VmRSS:\s+(\d+) kB/.exec(status);
    const hwm = /VmHWM:\s+(\d+) kB/.exec(status);
    if (rss !== null) this.maxRssBytes = Math.max(this.maxRssBytes, Number(rss[1]) * 1024);
    if (hwm !== null) this.hwmBytes = Math.max(this.hwmBytes, Number(hwm[1]) * 1024);
    this.samples++;
  }

  stop(): void {
    this.sample();
    clearInterval(this.#timer);
  }
}

/** Filesystem facts of a path: `df --output=source,fstype,target`. */
export async function filesystemOf(path: string): Promise<string> {
  const { stdout } = await run(["df", "--output=source,fstype,target", path]);
  const line = stdout.trim().split("\n").at(-1) ?? "";
  const [source, fstype, target] = line.trim().split(/\s+/);
  return `${fstype} ${source} mounted on ${target}`;
}

/** True when `path` lives on a tmpfs. */
export async function isTmpfs(path: string): Promise<boolean> {
  return (await filesystemOf(path)).startsWith("tmpfs");
}

/**
 * A scratch directory on a real disk: under /tmp unless /tmp is a tmpfs, then under /var/tmp
 * (override with SECTORLOG_BENCH_DIR).
 */
export async function diskScratchDir(prefix: string): Promise<string> {
  let parent = Deno.env.get("SECTORLOG_BENCH_DIR");
  if (parent === undefined) parent = (await isTmpfs("/tmp")) ? "/var/tmp" : "/tmp";
  if (await isTmpfs(parent)) throw new Error(`Scratch parent ${parent} is a tmpfs, not a disk`);
  return await Deno.makeTempDir({ dir: parent, prefix });
}

/** Machine facts printed above every run. */
export interface MachineFacts {
  nproc: number;
  cpuModel: string;
  memTotalGiB: number;
  kernel: string;
  deno: string;
  loadAvg: string;
}

export async function machineFacts(): Promise<MachineFacts> {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo");
  const meminfo = await Deno.readTextFile("/proc/meminfo");
  const memKb = Number(/MemTotal:\s+(\d+)/.exec(meminfo)?.[1] ?? 0);
  return {
    nproc: navigator.hardwareConcurrency,
    cpuModel: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1] ?? "unknown",
    memTotalGiB: Math.round(memKb / 1024 / 1024 * 10) / 10,
    kernel: Deno.osRelease(),
    deno: Deno.version.deno,
    loadAvg: (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3).join(" "),
  };
}

/** Current 1-minute load average (other engineers share the machine). */
export async function loadAverage(): Promise<string> {
  return (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3).join(" ");
}

/** A deterministic xorshift128 generator: fast random bytes and numbers with a printed seed. */
export class Prng {
  #s0: number;
  #s1: number;
  #s2: number;
  #s3: number;

  constructor(seed: number) {
    this.#s0 = seed | 1;
    this.#s1 = 0x9e3779b9 ^ seed;
    this.#s2 = 0x85ebca6b;
    this.#s3 = 0xc2b2ae35;
    for (let i = 0; i < 16; i++) this.nextUint32();
  }

  nextUint32(): number {
    let t = this.#s3;
    const s = this.#s0;
    this.#s3 = this.#s2;
    this.#s2 = this.#s1;
    this.#s1 = s;
    t ^= t << 11;
    t ^= t >>> 8;
    this.#s0 = t ^ s ^ (s >>> 19);
    return this.#s0 >>> 0;
  }

  /** An integer in [0, bound). */
  below(bound: number): number {
    return Math.floor((this.nextUint32() / 0x1_0000_0000) * bound);
  }

  /** Fills `bytes` (length a multiple of 4, 4-aligned) with random data. */
  fill(bytes: Uint8Array): void {
    const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
    for (let i = 0; i < words.length; i++) words[i] = this.nextUint32();
  }
}

/** Formats a number with a fixed count of decimals, or "-" when undefined. */
export function num(value: number | undefined, decimals = 1): string {
  return value === undefined || !Number.isFinite(value) ? "-" : value.toFixed(decimals);
}

/** PASS when `ratio` meets `target` in the given direction, else BELOW (or ABOVE for maxima). */
export function verdict(value: number, target: number, kind: "min" | "max"): string {
  if (!Number.isFinite(value)) return "n/a";
  if (kind === "min") return value >= target ? "PASS" : "BELOW";
  return value <= target ? "PASS" : "ABOVE";
}

/** Prints rows as an aligned text table with a header rule. */
export function printTable(headers: string[], rows: string[][]): void {
  const widths = headers.map((header, column) =>
    Math.max(header.length, ...rows.map((row) => (row[column] ?? "").length))
  );
  const line = (cells: string[]) =>
    cells.map((cell, column) => (cell ?? "").padEnd(widths[column])).join("  ").trimEnd();
  console.log(line(headers));
  console.log(widths.map((width) => "-".repeat(width)).join("  "));
  for (const row of rows) console.log(line(row));
}

/** Removes a path recursively, ignoring a missing one. */
export async function removeAll(path: string): Promise<void> {
  try {
    await Deno.remove(path, { recursive: true });
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

/** MB per second (10^6 bytes) from bytes and milliseconds. */
export function mbPerSecond(bytes: number, ms: number): number {
  return bytes / 1e6 / (ms / 1000);
}

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

/** The random-write workload a bench journals through the log-assisted disk. */
export interface RandomWrites {
  deviceBytes: number;
  journalBytes: number;
  /** Write sizes run from writeBytesMin to writeBytesMax in steps of alignBytes. */
  writeBytesMin: number;
  writeBytesMax: number;
  /** Offsets and size steps are multiples of this. */
  alignBytes: number;
  flushEveryWrites: number;
}

/** Journals `workload.journalBytes` of random writes, then flushes and seals. */
export async function journalRandomWrites(
  devicePath: string,
  logdir: string,
  prng: Prng,
  workload: RandomWrites,
): Promise<{ writes: number; flushes: number; bytes: number; ms: number }> {
  const { deviceBytes, journalBytes, writeBytesMin, writeBytesMax, alignBytes } = workload;
  const startedMs = performance.now();
  const disk = await LogAssistedDisk.open(devicePath, logdir, { purpose: "bench" });
  let writes = 0;
  let flushes = 0;
  let bytes = 0;
  try {
    const sizes = (writeBytesMax - writeBytesMin) / alignBytes + 1;
    while (bytes < journalBytes) {
      const lengthBytes = Math.min(
        writeBytesMin + alignBytes * prng.below(sizes),
        journalBytes - bytes,
      );
      const offsetBytes = alignBytes * prng.below((deviceBytes - lengthBytes) / alignBytes + 1);
      // The disk keeps no reference after write() returns, but NBD hands it a fresh buffer per
      // request, so do the same here.
      const data = new Uint8Array(lengthBytes);
      prng.fill(data);
      await disk.write(offsetBytes, data);
      writes++;
      bytes += lengthBytes;
      if (writes % workload.flushEveryWrites === 0) {
        await disk.flush();
        flushes++;
      }
    }
    await disk.flush();
    flushes++;
  } finally {
    await disk.close({ seal: true });
  }
  return { writes, flushes, bytes, ms: performance.now() - startedMs };
}

/** Writes an image whose first `dataBytes` are random data and whose rest is a hole. */
export async function writeDataThenHole(
  path: string,
  prng: Prng,
  sizes: { dataBytes: number; deviceBytes: number },
): Promise<void> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    const chunk = new Uint8Array(MiB);
    for (let offset = 0; offset < sizes.dataBytes; offset += chunk.length) {
      prng.fill(chunk);
      let written = 0;
      while (written < chunk.length) written += await file.write(chunk.subarray(written));
    }
    await file.truncate(sizes.deviceBytes);
  } finally {
    file.close();
  }
}
