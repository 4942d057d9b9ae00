/**
 * Shared pieces of the ship tests: source logdirs that grow through the log-assisted disk,
 * `sectorlog receive` and `sectorlog ship` as child processes, and exactness checks that compare
 * restores of a source and of its receiver copy.
 *
 * @module
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { readTimeline } from "../lib/timeline.ts";
import type { TimeSpec } from "../lib/time.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { type FakeClock, type Random, readAll } from "./_helpers.ts";
import { assertFilesEqual, CLI_MAIN, REPO_DIR, sleep } from "./_watch_harness.ts";

/** Device size of the test sources: small, with data, zero runs and holes. */
export const SOURCE_DEVICE_BYTES = 1024 * 1024 + 4096;
/** Small segments, so that shipping crosses seals. */
export const SOURCE_SEGMENT_BYTES_MAX = 48 * 1024;

/** A source logdir and the image it journals. */
export interface Source {
  image: string;
  logdir: string;
  hostId: string;
}

/** Makes an image with random data in some places and holes elsewhere, and snapshots it. */
export async function makeSource(
  dir: string,
  hostId: string,
  random: Random,
  clock?: FakeClock,
): Promise<Source> {
  const image = join(dir, `${hostId}.img`);
  const logdir = join(dir, `${hostId}-log`);
  const bytes = new Uint8Array(SOURCE_DEVICE_BYTES);
  for (let i = 0; i < 8; i++) {
    const start = random.int(0, SOURCE_DEVICE_BYTES - 40_000);
    random.fill(bytes.subarray(start, start + random.int(1, 40_000)));
  }
  await Deno.writeFile(image, bytes);
  await takeSnapshot(image, logdir, { hostId, clock: clock?.fn });
  return { image, logdir, hostId };
}

/** Appends `count` random writes, zeroes, trims, flushes and marks through the LAD. */
export async function writeEntries(
  source: Source,
  random: Random,
  count: number,
  clock?: FakeClock,
): Promise<void> {
  const disk = await LogAssistedDisk.open(source.image, source.logdir, {
    clock: clock?.fn,
    segmentBytesMax: SOURCE_SEGMENT_BYTES_MAX,
  });
  try {
    for (let i = 0; i < count; i++) {
      await applyRandomOp(disk, random, `m${i}`);
      clock?.advance(random.int(0, 3) * 1000);
    }
  } finally {
    await disk.close();
  }
}

/** One random operation on an open disk. */
export async function applyRandomOp(
  disk: LogAssistedDisk,
  random: Random,
  markName: string,
): Promise<void> {
  const choice = random.int(0, 99);
  const offset = random.int(0, 250) * 4096;
  if (choice < 70) {
    const data = new Uint8Array(random.int(1, 8) * 512);
    random.fill(data);
    await disk.write(offset, data);
  } else if (choice < 80) {
    await disk.zero(offset, random.int(1, 16) * 512);
  } else if (choice < 88) {
    await disk.trim(offset, random.int(1, 16) * 512);
  } else if (choice < 98) {
    await disk.flush();
  } else {
    await disk.mark(markName);
  }
}

/** The seq of the last entry of a logdir (applyFromSeq - 1 when it has none). */
export async function lastSeqOf(logdir: string): Promise<number> {
  return (await readTimeline(logdir)).lastSeq;
}

/**
 * Checks that restores of `copy` equal restores of `source` at the latest state and at the given
 * points (and that `verify` finds `copy` clean).
 */
export async function assertSameRestores(
  source: string,
  copy: string,
  scratch: string,
  points: (TimeSpec | undefined)[],
): Promise<void> {
  const verify = await verifyLogdir(copy);
  assert.ok(verify.ok, `verify ${copy}: ${JSON.stringify(verify.problems)}`);
  for (const [i, at] of points.entries()) {
    const a = join(scratch, `restore-source-${i}.img`);
    const b = join(scratch, `restore-copy-${i}.img`);
    await restoreAt(source, a, { at, force: true });
    await restoreAt(copy, b, { at, force: true });
    assertFilesEqual(b, a, `restore at ${JSON.stringify(at ?? "latest")}`);
    await Deno.remove(a);
    await Deno.remove(b);
  }
}

/** Seq points spread over a logdir's restorable window, plus its marks and the latest state. */
export async function restorePoints(logdir: string, count = 4): Promise<(TimeSpec | undefined)[]> {
  const timeline = await readTimeline(logdir);
  const points: (TimeSpec | undefined)[] = [undefined];
  const span = timeline.lastSeq - timeline.floorSeq;
  for (let i = 0; i < count && span > 0; i++) {
    points.push({ kind: "seq", seq: timeline.floorSeq + Math.floor((span * i) / count) });
  }
  const mark = timeline.marks.find((m) => m.restorable);
  if (mark !== undefined) points.push({ kind: "mark", name: mark.name });
  points.push({
    kind: "instant",
    timeUs: Math.floor((timeline.earliestUs + timeline.latestUs) / 2),
  });
  return points;
}

/** True when every byte of the two files is equal (no throw). */
export function sameBytes(a: string, b: string): boolean {
  const x = readAll(a);
  const y = readAll(b);
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

/** Lists a directory's names, sorted (empty when it does not exist). */
export function listNames(dir: string): string[] {
  try {
    return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
  } catch {
    return [];
  }
}

/** A child process of the CLI whose stderr is collected as it arrives. */
export class CliProcess {
  readonly child: Deno.ChildProcess;
  readonly args: string[];
  #stderr = "";
  #stdout = "";
  #collecting: Promise<void>;
  #status: Promise<Deno.CommandStatus>;
  exited: Deno.CommandStatus | undefined;

  constructor(args: string[], options: { env?: Record<string, string> } = {}) {
    this.args = args;
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", CLI_MAIN, ...args],
      env: options.env,
      cwd: REPO_DIR,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#collecting = Promise.all([
      this.#collect(this.child.stderr, (t) => this.#stderr += t),
      this.#collect(this.child.stdout, (t) => this.#stdout += t),
    ]).then(() => {});
    this.#status = this.child.status.then((status) => this.exited = status);
  }

  async #collect(stream: ReadableStream<Uint8Array>, add: (text: string) => void) {
    const decoder = new TextDecoder();
    for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
  }

  get stderr(): string {
    return this.#stderr;
  }

  get stdout(): string {
    return this.#stdout;
  }

  /** Waits until stderr matches `pattern` (throws if the process exits first or time runs out). */
  async waitFor(pattern: RegExp, ms = 60_000): Promise<RegExpMatchArray> {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      const match = this.#stderr.match(pattern);
      if (match !== null) return match;
      if (this.exited !== undefined) {
        await this.#collecting;
        const late = this.#stderr.match(pattern);
        if (late !== null) return late;
        throw new Error(
          `sectorlog ${
            this.args.join(" ")
          } exited ${this.exited.code} before printing ${pattern}; stderr:\n${this.#stderr}`,
        );
      }
      await sleep(25);
    }
    throw new Error(`sectorlog ${this.args[0]} did not print ${pattern}; stderr:\n${this.#stderr}`);
  }

  /** Sends `signal` and waits for the exit status and all output. */
  async stop(signal: Deno.Signal = "SIGTERM", ms = 60_000): Promise<Deno.CommandStatus> {
    if (this.exited === undefined) {
      try {
        this.child.kill(signal);
      } catch { /* exited meanwhile */ }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<undefined>((resolve) =>
      timer = setTimeout(() => resolve(undefined), ms)
    );
    const status = await Promise.race([this.#status, timeout]);
    clearTimeout(timer);
    if (status === undefined) {
      this.child.kill("SIGKILL");
      await this.#status;
      await this.#collecting;
      throw new Error(
        `sectorlog ${this.args[0]} did not stop on ${signal}; stderr:\n${this.#stderr}`,
      );
    }
    await this.#collecting;
    return status;
  }

  /** Waits for the process to exit on its own. */
  async wait(): Promise<Deno.CommandStatus> {
    const status = await this.#status;
    await this.#collecting;
    return status;
  }

  /** For `finally`: kill -9 if still running; never throws. */
  async close(): Promise<void> {
    try {
      await this.stop("SIGKILL");
    } catch {
      // Nothing more to do.
    }
  }
}

/** `sectorlog receive` as a child; resolves once it listens, with its port. */
export async function startReceive(
  storedir: string,
  args: string[] = [],
  port = 0,
  env?: Record<string, string>,
): Promise<{ process: CliProcess; port: number }> {
  const process = new CliProcess(
    ["receive", storedir, "--listen", `127.0.0.1:${port}`, ...args],
    { env },
  );
  try {
    const match = await process.waitFor(/listening on [^:]+:(\d+)/);
    return { process, port: Number(match[1]) };
  } catch (error) {
    await process.close();
    throw error;
  }
}

/** Waits until `check` returns true, polling; throws with `what` after `ms`. */
export async function waitUntil(
  check: () => Promise<boolean> | boolean,
  what: string,
  ms = 60_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** The seq the receiver copy of a host holds, or 0 when it has none yet. */
export async function copyLastSeq(storedir: string, hostId: string): Promise<number> {
  try {
    await readManifest(join(storedir, hostId));
  } catch {
    return 0;
  }
  return await lastSeqOf(join(storedir, hostId));
}
