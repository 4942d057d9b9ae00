/**
 * The log directory: base snapshot + segments of entries + a manifest, and the one lock that
 * makes a single process its writer.
 *
 * ```text
 * logdir/
 *   manifest.json            what the logdir holds (replaced atomically)
 *   base-<µs>.img            sparse raw image of the device when the log began
 *   segments/<hex seq>.seg   entries; every one listed in the manifest is sealed,
 *                            the one after them is the live (active) segment
 *   levels/<hex seq>.lvl     compacted levels
 *   lock                     flock'd by the writer; holds its pid
 *   control.sock             the running writer's control socket (watch)
 * ```
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { BusyError, IntegrityError, UsageError } from "../errors.ts";
import type { EntryHeader } from "./entry.ts";
import {
  decodeManifest,
  encodeManifest,
  type Manifest,
  MANIFEST_BYTES_MAX,
  nextSeqAfterSealed,
  type SegmentInfo,
} from "./manifest.ts";
import { parseSegmentFileName, type ScannedEntry, SegmentScanner } from "./segment.ts";

/** File names inside a logdir. */
export const MANIFEST_FILE = "manifest.json";
/**
 * The base snapshot's file name, made unique by its start time so that a new base never
 * overwrites the one the current manifest names.
 */
export function baseFileName(startedUs: number): string {
  return `base-${startedUs}.img`;
}
/** Folder of segment files. */
export const SEGMENTS_DIR = "segments";
/** Folder of level files. */
export const LEVELS_DIR = "levels";
/** The writer lock file. */
export const LOCK_FILE = "lock";
/** The control socket of a running `watch`. */
export const CONTROL_SOCKET_FILE = "control.sock";

/** Reads and validates the manifest of `logdir`, with a helpful error when there is none. */
export async function readManifest(logdir: string): Promise<Manifest> {
  const path = join(logdir, MANIFEST_FILE);
  let text: string;
  try {
    const stat = await Deno.stat(path);
    if (stat.size > MANIFEST_BYTES_MAX) {
      throw new IntegrityError(`Manifest ${path} is ${stat.size} bytes: too large`, { path });
    }
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      const what = await exists(logdir) ? "it has no manifest.json" : "no such directory";
      throw new UsageError(`Cannot open logdir ${logdir}: ${what}`, {
        hint: `run \`sectorlog snapshot <device> ${logdir}\` first`,
      });
    }
    throw error;
  }
  return decodeManifest(text, path);
}

/**
 * The manifest's current bytes, to tell whether it changed during a long read: a compaction (or
 * a seal) may replace it, and a compaction then deletes files the old manifest named.
 */
export async function manifestFingerprint(logdir: string): Promise<string> {
  try {
    return await Deno.readTextFile(join(logdir, MANIFEST_FILE));
  } catch {
    return "";
  }
}

/**
 * Runs a whole read of the logdir (a restore, a verify) and, when it fails with an
 * {@linkcode IntegrityError} while the manifest changed under it, runs it again against the new
 * manifest: a file that a concurrent compaction removed is not corruption. A failure with the
 * manifest unchanged is reported as it is.
 */
export async function withConsistentRead<T>(
  logdir: string,
  read: () => Promise<T>,
  options: { isProblem?: (result: T) => boolean } = {},
): Promise<T> {
  for (let attempt = 1;; attempt++) {
    const before = await manifestFingerprint(logdir);
    let result: T;
    try {
      result = await read();
    } catch (error) {
      const retry = error instanceof IntegrityError && attempt < CONSISTENT_READ_ATTEMPTS_MAX &&
        (await manifestFingerprint(logdir)) !== before;
      if (!retry) throw error;
      continue;
    }
    const suspicious = options.isProblem?.(result) === true &&
      attempt < CONSISTENT_READ_ATTEMPTS_MAX && (await manifestFingerprint(logdir)) !== before;
    if (!suspicious) return result;
  }
}

/** How many times {@linkcode withConsistentRead} runs a read whose manifest keeps changing. */
export const CONSISTENT_READ_ATTEMPTS_MAX = 3;

/** Replaces the manifest atomically: write temp, fsync, rename over, fsync the directory. */
export async function writeManifest(logdir: string, manifest: Manifest): Promise<void> {
  const path = join(logdir, MANIFEST_FILE);
  const tempPath = `${path}.tmp-${Deno.pid}`;
  const file = await Deno.open(tempPath, { write: true, create: true, truncate: true });
  try {
    const bytes = new TextEncoder().encode(encodeManifest(manifest));
    let done = 0;
    while (done < bytes.length) done += await file.write(bytes.subarray(done));
    await file.syncData();
  } finally {
    file.close();
  }
  await Deno.rename(tempPath, path);
  await syncDirectory(logdir);
}

/** fsyncs a directory so that a rename or create inside it is durable. */
export async function syncDirectory(path: string): Promise<void> {
  const dir = await Deno.open(path, { read: true });
  try {
    await dir.sync();
  } finally {
    dir.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

/** The exclusive writer lock of a logdir (flock on `logdir/lock`, which holds the pid). */
export class LogdirLock {
  readonly path: string;
  #file: Deno.FsFile | undefined;

  private constructor(path: string, file: Deno.FsFile) {
    this.path = path;
    this.#file = file;
  }

  /**
   * Takes the lock or throws {@linkcode BusyError} naming the holder's pid. `options.file` names
   * another lock file in the logdir (compaction has its own), `options.heldBy` says who holds it.
   */
  static async acquire(
    logdir: string,
    purpose: string,
    options: { file?: string; heldBy?: string } = {},
  ): Promise<LogdirLock> {
    const path = join(logdir, options.file ?? LOCK_FILE);
    const file = await Deno.open(path, { read: true, write: true, create: true });
    if (!(await file.tryLock(true))) {
      file.close();
      const holder = await readLockHolder(path);
      throw new BusyError(
        `Cannot ${purpose} ${logdir}: ${options.heldBy ?? "another process holds its lock"}` +
          (holder === undefined ? ` (${path})` : ` (pid ${holder.pid}, ${holder.purpose})`),
        { holderPid: holder?.pid },
      );
    }
    await file.truncate(0);
    await file.write(new TextEncoder().encode(`${Deno.pid} ${purpose}\n`));
    return new LogdirLock(path, file);
  }

  /** Releases the lock. */
  release(): void {
    if (this.#file === undefined) return;
    try {
      this.#file.truncateSync(0);
    } finally {
      this.#file.close();
      this.#file = undefined;
    }
  }
}

/** Reads `pid purpose` from a lock file, if it holds one. */
export async function readLockHolder(
  path: string,
): Promise<{ pid: number; purpose: string } | undefined> {
  try {
    const text = (await Deno.readTextFile(path)).trim();
    const match = /^(\d+) (.*)$/.exec(text);
    return match === null ? undefined : { pid: Number(match[1]), purpose: match[2] };
  } catch {
    return undefined;
  }
}

/** A segment file as a reader sees it. */
export interface SegmentRef {
  path: string;
  file: string;
  firstSeq: number;
  /** Listed in the manifest: complete and never written again. */
  sealed: boolean;
  /** The manifest's record, for sealed segments. */
  info?: SegmentInfo;
}

/** Lists the sealed segments of `manifest` and the live ones after them, in log order. */
export async function listSegments(logdir: string, manifest: Manifest): Promise<SegmentRef[]> {
  const dir = join(logdir, SEGMENTS_DIR);
  const refs: SegmentRef[] = manifest.segments.map((info) => ({
    path: join(dir, info.file),
    file: info.file,
    firstSeq: info.firstSeq,
    sealed: true,
    info,
  }));
  const liveFrom = nextSeqAfterSealed(manifest);
  const live: SegmentRef[] = [];
  try {
    for await (const item of Deno.readDir(dir)) {
      const firstSeq = parseSegmentFileName(item.name);
      // Files before liveFrom that the manifest no longer lists are leftovers of a compaction.
      if (firstSeq === undefined || firstSeq < liveFrom || !item.isFile) continue;
      live.push({ path: join(dir, item.name), file: item.name, firstSeq, sealed: false });
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  live.sort((a, b) => a.firstSeq - b.firstSeq);
  return [...refs, ...live];
}

/** An entry read from a logdir, with where it came from. */
export interface LogEntry extends ScannedEntry {
  segmentPath: string;
}

/** Options of {@linkcode readLogEntries}. */
export interface ReadLogEntriesOptions {
  /** Skip entries before this seq (default: the base's replay point). */
  fromSeq?: number;
  /** Read headers only (payloads empty and unchecked, except the names of marks). */
  headersOnly?: boolean;
  /** Called when the live segment ends in a torn tail (a crash, or an append in progress). */
  onTornTail?: (
    info: { path: string; offsetBytes: number; bytes: number; problem: string },
  ) => void;
  /**
   * When given, corruption ends the log instead of throwing: the error is passed here and the
   * entries before it are all that is yielded (`restore --stop-at-corruption`).
   */
  onCorruption?: (error: IntegrityError) => void;
}

/**
 * Yields the entries of the logdir's segments in log order, checking that seq increases by one
 * and time never decreases. A live segment may end in a torn tail; anything else wrong is an
 * {@linkcode IntegrityError} naming the file and offset.
 */
export async function* readLogEntries(
  logdir: string,
  manifest: Manifest,
  options: ReadLogEntriesOptions = {},
): AsyncGenerator<LogEntry> {
  try {
    yield* readLogEntriesStrict(logdir, manifest, options);
  } catch (error) {
    if (!(error instanceof IntegrityError) || options.onCorruption === undefined) throw error;
    options.onCorruption(error);
  }
}

async function* readLogEntriesStrict(
  logdir: string,
  manifest: Manifest,
  options: ReadLogEntriesOptions,
): AsyncGenerator<LogEntry> {
  const fromSeq = options.fromSeq ?? 1;
  const segments = await listSegments(logdir, manifest);
  let expectedSeq: number | undefined;
  let lastTimeUs = Number.MIN_SAFE_INTEGER;
  for (let index = 0; index < segments.length; index++) {
    const segment = segments[index];
    if (segment.info !== undefined && segment.info.lastSeq < fromSeq) {
      expectedSeq = segment.info.lastSeq + 1;
      lastTimeUs = segment.info.lastUs;
      continue;
    }
    const isLast = index === segments.length - 1;
    const scanner = new SegmentScanner(segment.path, {
      tolerateTornTail: !segment.sealed && isLast,
      endBytes: segment.info?.sizeBytes,
      headersOnly: options.headersOnly,
    });
    let expectedInFile = segment.firstSeq;
    if (expectedSeq !== undefined && expectedSeq !== segment.firstSeq) {
      throw new IntegrityError(
        `Gap in the log: ${segment.path} starts at seq ${segment.firstSeq}, expected ${expectedSeq}`,
        { path: segment.path, offsetBytes: 0 },
      );
    }
    for await (const entry of scanner.entries()) {
      checkOrder(entry, segment.path, expectedInFile, lastTimeUs);
      expectedInFile = entry.header.seq + 1;
      lastTimeUs = entry.header.timeUs;
      if (entry.header.seq >= fromSeq) yield { ...entry, segmentPath: segment.path };
    }
    if (segment.info !== undefined) checkSealedTotals(segment, expectedInFile - 1);
    if (scanner.tornBytes > 0) {
      options.onTornTail?.({
        path: segment.path,
        offsetBytes: scanner.validBytes,
        bytes: scanner.tornBytes,
        problem: scanner.tornProblem ?? "torn",
      });
    }
    expectedSeq = expectedInFile;
  }
}

function checkOrder(entry: ScannedEntry, path: string, expectedSeq: number, lastTimeUs: number) {
  const { seq, timeUs } = entry.header;
  if (seq !== expectedSeq) {
    throw new IntegrityError(
      `Out-of-sequence entry in ${path} at offset ${entry.fileOffsetBytes}: seq ${seq}, expected ${expectedSeq}`,
      { path, offsetBytes: entry.fileOffsetBytes },
    );
  }
  if (timeUs < lastTimeUs) {
    throw new IntegrityError(
      `Time goes backwards in ${path} at offset ${entry.fileOffsetBytes}: seq ${seq} has ${timeUs} µs, the entry before ${lastTimeUs} µs`,
      { path, offsetBytes: entry.fileOffsetBytes },
    );
  }
}

function checkSealedTotals(segment: SegmentRef, lastSeq: number): void {
  assert(segment.info !== undefined, "sealed segment without info");
  if (lastSeq !== segment.info.lastSeq) {
    throw new IntegrityError(
      `Sealed segment ${segment.path} ends at seq ${lastSeq}, the manifest says ${segment.info.lastSeq}`,
      { path: segment.path, offsetBytes: segment.info.sizeBytes },
    );
  }
}

/** Summary of the entries held by a logdir, from headers only. */
export interface LogExtent {
  /** Seq of the first entry a restore replays (on top of base and levels). */
  firstSeq: number;
  /** Seq of the last entry, or firstSeq - 1 when the log is empty. */
  lastSeq: number;
  /** Time of the last entry, or undefined when the log is empty. */
  lastUs: number | undefined;
}

/** Every header of the logdir (sealed and live), as an array-free scan callback. */
export async function scanHeaders(
  logdir: string,
  manifest: Manifest,
  visit: (header: EntryHeader, entry: LogEntry) => void,
  options: Omit<ReadLogEntriesOptions, "headersOnly"> = {},
): Promise<void> {
  for await (const entry of readLogEntries(logdir, manifest, { ...options, headersOnly: true })) {
    visit(entry.header, entry);
  }
}

/** Creates the logdir folders if they do not exist. */
export async function ensureLogdirFolders(logdir: string): Promise<void> {
  await Deno.mkdir(join(logdir, SEGMENTS_DIR), { recursive: true });
  await Deno.mkdir(join(logdir, LEVELS_DIR), { recursive: true });
}

/** Removes `path` if it exists. */
export function removeIfExists(path: string): void {
  try {
    fs.unlinkSync(path);
  } catch (error) {
    if ((error as { code?: string }).code !== "ENOENT") throw error;
  }
}

/** The file that serializes read-modify-write of the manifest between processes. */
export const MANIFEST_LOCK_FILE = "manifest.lock";

/**
 * Runs `update` while holding the manifest lock, so that a writer sealing a segment and a
 * compaction swapping levels never overwrite each other's manifest. Waits for the lock.
 */
export async function withManifestLock<T>(logdir: string, update: () => Promise<T>): Promise<T> {
  const file = await Deno.open(join(logdir, MANIFEST_LOCK_FILE), {
    read: true,
    write: true,
    create: true,
  });
  try {
    await file.lock(true);
    return await update();
  } finally {
    file.close();
  }
}
