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
 *   synced                   the sync record: what the writer knows to be durable
 *   control.sock             the running writer's control socket (watch)
 * ```
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { BusyError, IntegrityError, UsageError } from "../errors.ts";
import { realStorage } from "../storage/real_storage.ts";
import {
  exists,
  readTextFile,
  replaceFileDurably,
  type Storage,
  type StorageFile,
  StorageNotFound,
  unlinkIfExists,
} from "../storage/storage.ts";
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
import { readSyncRecord, SYNC_RECORD_FILE, type SyncRecord } from "./sync_record.ts";

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
export function readManifest(logdir: string, storage: Storage = realStorage): Promise<Manifest> {
  const path = join(logdir, MANIFEST_FILE);
  let text: string;
  try {
    text = readTextFile(storage, path, MANIFEST_BYTES_MAX);
  } catch (error) {
    if (error instanceof StorageNotFound) {
      const what = exists(storage, logdir) ? "it has no manifest.json" : "no such directory";
      return Promise.reject(
        new UsageError(`Cannot open logdir ${logdir}: ${what}`, {
          hint: `run \`sectorlog snapshot <device> ${logdir}\` first`,
        }),
      );
    }
    if (error instanceof RangeError) {
      return Promise.reject(new IntegrityError(`Manifest ${error.message}: too large`, { path }));
    }
    return Promise.reject(error);
  }
  try {
    return Promise.resolve(decodeManifest(text, path));
  } catch (error) {
    return Promise.reject(error);
  }
}

/**
 * The manifest's current bytes, to tell whether it changed during a long read: a compaction (or
 * a seal) may replace it, and a compaction then deletes files the old manifest named.
 */
export function manifestFingerprint(
  logdir: string,
  storage: Storage = realStorage,
): Promise<string> {
  try {
    return Promise.resolve(readTextFile(storage, join(logdir, MANIFEST_FILE), MANIFEST_BYTES_MAX));
  } catch {
    return Promise.resolve("");
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
  options: { isProblem?: (result: T) => boolean; storage?: Storage } = {},
): Promise<T> {
  const storage = options.storage ?? realStorage;
  for (let attempt = 1;; attempt++) {
    const before = await manifestFingerprint(logdir, storage);
    let result: T;
    try {
      result = await read();
    } catch (error) {
      const retry = error instanceof IntegrityError && attempt < CONSISTENT_READ_ATTEMPTS_MAX &&
        (await manifestFingerprint(logdir, storage)) !== before;
      if (!retry) throw error;
      continue;
    }
    const suspicious = options.isProblem?.(result) === true &&
      attempt < CONSISTENT_READ_ATTEMPTS_MAX &&
      (await manifestFingerprint(logdir, storage)) !== before;
    if (!suspicious) return result;
  }
}

/** How many times {@linkcode withConsistentRead} runs a read whose manifest keeps changing. */
export const CONSISTENT_READ_ATTEMPTS_MAX = 3;

/** Replaces the manifest atomically: write temp, fsync, rename over, fsync the directory. */
export async function writeManifest(
  logdir: string,
  manifest: Manifest,
  storage: Storage = realStorage,
): Promise<void> {
  const bytes = new TextEncoder().encode(encodeManifest(manifest));
  await replaceFileDurably(storage, join(logdir, MANIFEST_FILE), bytes, {
    tempSuffix: `.tmp-${Deno.pid}`,
  });
}

/** fsyncs a directory so that a rename or create inside it is durable. */
export function syncDirectory(path: string, storage: Storage = realStorage): Promise<void> {
  return storage.syncDirectory(path);
}

/** The exclusive writer lock of a logdir (flock on `logdir/lock`, which holds the pid). */
export class LogdirLock {
  readonly path: string;
  #file: StorageFile | undefined;

  private constructor(path: string, file: StorageFile) {
    this.path = path;
    this.#file = file;
  }

  /**
   * Takes the lock or throws {@linkcode BusyError} naming the holder's pid. `options.file` names
   * another lock file in the logdir (compaction has its own), `options.heldBy` says who holds it.
   */
  static acquire(
    logdir: string,
    purpose: string,
    options: { file?: string; heldBy?: string; storage?: Storage } = {},
  ): Promise<LogdirLock> {
    const storage = options.storage ?? realStorage;
    const path = join(logdir, options.file ?? LOCK_FILE);
    let file: StorageFile;
    try {
      file = storage.open(path, { create: true });
    } catch (error) {
      return Promise.reject(error);
    }
    if (!file.tryLock()) {
      file.close();
      const holder = readLockHolder(path, storage);
      return Promise.reject(
        new BusyError(
          `Cannot ${purpose} ${logdir}: ${options.heldBy ?? "another process holds its lock"}` +
            (holder === undefined ? ` (${path})` : ` (pid ${holder.pid}, ${holder.purpose})`),
          { holderPid: holder?.pid },
        ),
      );
    }
    try {
      const text = new TextEncoder().encode(`${Deno.pid} ${purpose}\n`);
      file.truncate(0);
      file.write(text, text.length, 0);
    } catch (error) {
      file.close();
      return Promise.reject(error);
    }
    return Promise.resolve(new LogdirLock(path, file));
  }

  /** Releases the lock. */
  release(): void {
    if (this.#file === undefined) return;
    try {
      this.#file.truncate(0);
    } catch {
      // A writer that cannot empty its lock file still releases the lock by closing it.
    } finally {
      this.#file.close();
      this.#file = undefined;
    }
  }
}

/** Reads `pid purpose` from a lock file, if it holds one. */
export function readLockHolder(
  path: string,
  storage: Storage = realStorage,
): { pid: number; purpose: string } | undefined {
  try {
    const text = readTextFile(storage, path, 4096).trim();
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
export function listSegments(
  logdir: string,
  manifest: Manifest,
  storage: Storage = realStorage,
): Promise<SegmentRef[]> {
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
  let names: string[] = [];
  try {
    names = storage.readDir(dir);
  } catch (error) {
    if (!(error instanceof StorageNotFound)) return Promise.reject(error);
  }
  for (const name of names) {
    const firstSeq = parseSegmentFileName(name);
    // Files before liveFrom that the manifest no longer lists are leftovers of a compaction.
    if (firstSeq === undefined || firstSeq < liveFrom) continue;
    const path = join(dir, name);
    if (storage.stat(path)?.kind !== "file") continue;
    live.push({ path, file: name, firstSeq, sealed: false });
  }
  live.sort((a, b) => a.firstSeq - b.firstSeq);
  return Promise.resolve([...refs, ...live]);
}

/** The sync record of `logdir` (undefined when it has none or it does not decode). */
export function readLogdirSyncRecord(
  logdir: string,
  storage: Storage = realStorage,
): SyncRecord | undefined {
  return readSyncRecord(storage, join(logdir, SYNC_RECORD_FILE));
}

/** Bytes of the unsealed segment `segment` that the sync record says are durable. */
export function durableBytesOf(record: SyncRecord | undefined, segment: SegmentRef): number {
  if (record === undefined || segment.sealed) return 0;
  if (record.segmentFirstSeq === segment.firstSeq) return record.journalSyncedBytes;
  // A record about a later segment means this one was synced whole before it was left.
  return record.segmentFirstSeq > segment.firstSeq ? Number.MAX_SAFE_INTEGER : 0;
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
  /** Where the logdir lives (default: the local filesystem). */
  storage?: Storage;
}

/**
 * Yields the entries of the logdir's segments in log order, checking that seq increases by one
 * and time never decreases. The unsealed segments end at their first bad entry (a torn tail: a
 * crash, or an append in progress), unless it lies inside what the sync record says was durably
 * written; anything else wrong is an {@linkcode IntegrityError} naming the file and offset.
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
  const storage = options.storage ?? realStorage;
  const fromSeq = options.fromSeq ?? 1;
  // The record is read before the segments: what it says was durable is still there after.
  const record = readLogdirSyncRecord(logdir, storage);
  const segments = await listSegments(logdir, manifest, storage);
  let expectedSeq: number | undefined;
  let lastTimeUs = Number.MIN_SAFE_INTEGER;
  for (const segment of segments) {
    if (segment.info !== undefined && segment.info.lastSeq < fromSeq) {
      expectedSeq = segment.info.lastSeq + 1;
      lastTimeUs = segment.info.lastUs;
      continue;
    }
    if (expectedSeq !== undefined && expectedSeq !== segment.firstSeq) {
      // An unsealed file that does not follow on is beyond the torn tail of the one before it.
      if (!segment.sealed) return;
      throw new IntegrityError(
        `Gap in the log: ${segment.path} starts at seq ${segment.firstSeq}, expected ${expectedSeq}`,
        { path: segment.path, offsetBytes: 0 },
      );
    }
    const durableBytes = durableBytesOf(record, segment);
    const scanner = new SegmentScanner(segment.path, {
      storage,
      tolerateTornTail: !segment.sealed,
      durableBytes,
      endBytes: segment.info?.sizeBytes,
      headersOnly: options.headersOnly,
      payloadsFromBytes: segment.sealed ? undefined : durableBytes,
    });
    let expectedInFile = segment.firstSeq;
    let outOfOrder = false;
    for await (const entry of scanner.entries()) {
      const problem = orderProblem(entry, segment.path, expectedInFile, lastTimeUs);
      if (problem !== undefined) {
        // In the unsynced tail, an entry that does not follow on ends the log like a torn one.
        if (!segment.sealed && entry.fileOffsetBytes >= durableBytes) {
          outOfOrder = true;
          options.onTornTail?.({
            path: segment.path,
            offsetBytes: entry.fileOffsetBytes,
            bytes: storage.stat(segment.path)!.sizeBytes - entry.fileOffsetBytes,
            problem: problem.message,
          });
          break;
        }
        throw problem;
      }
      expectedInFile = entry.header.seq + 1;
      lastTimeUs = entry.header.timeUs;
      if (entry.header.seq >= fromSeq) yield { ...entry, segmentPath: segment.path };
    }
    if (outOfOrder) return;
    if (segment.info !== undefined) checkSealedTotals(segment, expectedInFile - 1);
    if (scanner.tornBytes > 0) {
      options.onTornTail?.({
        path: segment.path,
        offsetBytes: scanner.validBytes,
        bytes: scanner.tornBytes,
        problem: scanner.tornProblem ?? "torn",
      });
      return;
    }
    expectedSeq = expectedInFile;
  }
}

function orderProblem(
  entry: ScannedEntry,
  path: string,
  expectedSeq: number,
  lastTimeUs: number,
): IntegrityError | undefined {
  const { seq, timeUs } = entry.header;
  if (seq !== expectedSeq) {
    return new IntegrityError(
      `Out-of-sequence entry in ${path} at offset ${entry.fileOffsetBytes}: seq ${seq}, expected ${expectedSeq}`,
      { path, offsetBytes: entry.fileOffsetBytes },
    );
  }
  if (timeUs < lastTimeUs) {
    return new IntegrityError(
      `Time goes backwards in ${path} at offset ${entry.fileOffsetBytes}: seq ${seq} has ${timeUs} µs, the entry before ${lastTimeUs} µs`,
      { path, offsetBytes: entry.fileOffsetBytes },
    );
  }
  return undefined;
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
export function ensureLogdirFolders(logdir: string, storage: Storage = realStorage): Promise<void> {
  try {
    storage.mkdir(join(logdir, SEGMENTS_DIR), { recursive: true });
    storage.mkdir(join(logdir, LEVELS_DIR), { recursive: true });
    return Promise.resolve();
  } catch (error) {
    return Promise.reject(error);
  }
}

/** Removes `path` if it exists. */
export function removeIfExists(path: string, storage: Storage = realStorage): void {
  unlinkIfExists(storage, path);
}

/** The file that serializes read-modify-write of the manifest between processes. */
export const MANIFEST_LOCK_FILE = "manifest.lock";

/**
 * Runs `update` while holding the manifest lock, so that a writer sealing a segment and a
 * compaction swapping levels never overwrite each other's manifest. Waits for the lock.
 */
export async function withManifestLock<T>(
  logdir: string,
  update: () => Promise<T>,
  storage: Storage = realStorage,
): Promise<T> {
  const file = storage.open(join(logdir, MANIFEST_LOCK_FILE), { create: true });
  try {
    await file.lock();
    return await update();
  } finally {
    file.close();
  }
}
