/**
 * A view of the device as it was at a point in time, read straight from the logdir's files: no
 * restore, no copy. Opening it folds the levels and the entries up to the restore point into an
 * extent index (positions, never data), then every read is assembled from positional reads of
 * the base snapshot, the level files and the segment files. `sectorlog serve` puts one behind
 * an NBD server; `restore --in-place` reads the old state of the ranges it puts back from one.
 *
 * Every file the index points into is opened once, when the view opens, and kept open: a
 * compaction that removes files under a running view does not disturb it (on Linux an unlinked
 * file stays readable through its descriptor).
 *
 * Checks: entry headers are checked while the index is built (checksum, order, no gaps), and the
 * payload checksum of an entry the first time a read touches it (a bad one fails that read and
 * every later read of it with an {@linkcode IntegrityError}). The base snapshot's checksum covers
 * the whole image and is not checked here: `sectorlog verify` and `restore` check it.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { assert } from "./_assert.ts";
import { IntegrityError, UsageError } from "./errors.ts";
import { checkEntryInDevice, type Extent, ExtentMap, extentOfEntry } from "./extent_map.ts";
import {
  decodeEntryHeader,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  payloadMatches,
} from "./format/entry.ts";
import { LEVELS_DIR, listSegments, readLogEntries, readManifest } from "./format/logdir.ts";
import type { Manifest } from "./format/manifest.ts";
import { readFully } from "./fd_io.ts";
import { SegmentScanner } from "./format/segment.ts";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "./nbd/backend.ts";
import { resolveRestorePoint, type RestorePoint } from "./timeline.ts";
import type { TimeSpec } from "./time.ts";

/** Attempts at opening a view while a compaction replaces the files it is reading. */
const OPEN_ATTEMPTS_MAX = 3;

/** Options of {@linkcode PastView.open}. */
export interface PastViewOptions {
  /** The point in time to show (default: the latest state). */
  at?: TimeSpec;
  /** Round down to the last flush at or before the point (a filesystem-consistent state). */
  toFlush?: boolean;
  /** The present, for refusing future times (default: the wall clock). */
  nowUs?: number;
  /** Check each entry's payload checksum the first time a read touches it (default true). */
  verifyPayloads?: boolean;
}

/** What a view shows and what its index holds. */
export interface PastViewInfo {
  logdir: string;
  deviceBytes: number;
  /** The time the view represents. */
  targetUs: number;
  /** Seq of the last entry folded into the view (the horizon state when none). */
  targetSeq: number;
  /** Time of the last entry folded into the view. */
  lastEntryUs: number;
  /** Entries of the log folded into the index (levels not counted). */
  entriesIndexed: number;
  /** Extents in the index: its memory grows with these, never with the bytes they cover. */
  extents: number;
  /** Files held open: base, levels, segments. */
  files: number;
  /** Time spent opening the view. */
  openMs: number;
}

/** A file the index points into, opened once. */
interface Source {
  path: string;
  fd: number;
  /** Entries (by header offset) whose payload checksum a read has already checked. */
  verified: Set<number>;
  /** Checks under way (and failed ones, so that every later read of the entry fails too). */
  checking: Map<number, Promise<void>>;
}

/**
 * A read-only {@linkcode BlockBackend} of the device as it was at a point in time.
 *
 * @example
 * ```ts ignore
 * import { PastView } from "./past_view.ts";
 * import { parseTime } from "./time.ts";
 * const view = await PastView.open("/var/lib/sectorlog/vm1", { at: parseTime("-2h") });
 * const sector = new Uint8Array(512);
 * await view.read(0, sector);
 * view.close();
 * ```
 */
export class PastView implements BlockBackend {
  readonly sizeBytes: number;
  readonly readOnly = true;
  /** Nothing is ever written, so every connection sees the same bytes. */
  readonly canMultiConn = true;
  readonly info: PastViewInfo;
  #base: Source;
  #sources: Source[];
  #verifyPayloads: boolean;
  /** The index, as parallel arrays sorted by device offset (disjoint extents). */
  #starts: Float64Array;
  #lengths: Float64Array;
  /** Source index, or -1 for zeroes. */
  #sourceIndexes: Int32Array;
  #sourceOffsets: Float64Array;
  #entryOffsets: Float64Array;
  #scratch = new Uint8Array(0);
  #closed = false;

  private constructor(init: {
    info: PastViewInfo;
    base: Source;
    sources: Source[];
    map: ExtentMap;
    verifyPayloads: boolean;
  }) {
    this.info = init.info;
    this.sizeBytes = init.info.deviceBytes;
    this.#base = init.base;
    this.#sources = init.sources;
    this.#verifyPayloads = init.verifyPayloads;
    const extents = mergeExtents(init.map);
    this.#starts = new Float64Array(extents.length);
    this.#lengths = new Float64Array(extents.length);
    this.#sourceIndexes = new Int32Array(extents.length);
    this.#sourceOffsets = new Float64Array(extents.length);
    this.#entryOffsets = new Float64Array(extents.length);
    for (const [i, extent] of extents.entries()) {
      this.#starts[i] = extent.offsetBytes;
      this.#lengths[i] = extent.lengthBytes;
      this.#sourceIndexes[i] = extent.kind === "data" ? extent.sourceIndex : -1;
      this.#sourceOffsets[i] = extent.sourceOffsetBytes;
      this.#entryOffsets[i] = extent.entryOffsetBytes;
    }
    this.info.extents = extents.length;
  }

  /**
   * Opens the view of `logdir` at `options.at`, refusing times outside the restorable window
   * with a {@linkcode UsageError} that names the window. Retries when a compaction replaced the
   * logdir's files while it was reading them.
   */
  static async open(logdir: string, options: PastViewOptions = {}): Promise<PastView> {
    const startedMs = performance.now();
    for (let attempt = 1;; attempt++) {
      const point = await resolveRestorePoint(logdir, options.at, options);
      const manifest = point.timeline.manifest;
      const sources = new SourceTable();
      try {
        const base = openBase(logdir, manifest);
        sources.baseFd = base.fd;
        const map = new ExtentMap(manifest.deviceBytes);
        await foldLevels(logdir, manifest, map, sources);
        const entriesIndexed = await foldEntries(logdir, point, map, sources);
        const info: PastViewInfo = {
          logdir,
          deviceBytes: manifest.deviceBytes,
          targetUs: point.targetUs,
          targetSeq: point.targetSeq,
          lastEntryUs: point.lastEntryUs,
          entriesIndexed,
          extents: 0,
          files: sources.list.length + 1,
          openMs: 0,
        };
        const view = new PastView({
          info,
          base,
          sources: sources.list,
          map,
          verifyPayloads: options.verifyPayloads !== false,
        });
        info.openMs = Math.round(performance.now() - startedMs);
        return view;
      } catch (error) {
        sources.closeAll();
        if (attempt < OPEN_ATTEMPTS_MAX && await filesReplaced(logdir, manifest, error)) continue;
        throw error;
      }
    }
  }

  /**
   * Fills `buffer` with the device's bytes at `offsetBytes` as they were at the view's time. The
   * pieces of one read are read in parallel on the thread pool, and so are concurrent reads: on a
   * cold cache, the journal's scattered payloads need many reads in flight to keep a disk busy.
   */
  async read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const reads: Promise<void>[] = [];
    this.#walk(offsetBytes, buffer, (target, source, position, entryOffsetBytes) => {
      if (source === undefined) target.fill(0);
      else if (entryOffsetBytes === undefined || !this.#verifyPayloads) {
        reads.push(preadFully(source.fd, target, position));
      } else {
        reads.push(
          this.#verifyEntry(source, entryOffsetBytes).then(() =>
            preadFully(source.fd, target, position)
          ),
        );
      }
    });
    // The buffer is lent until this settles: wait for every read, even after one failed.
    const outcomes = await Promise.allSettled(reads);
    const failed = outcomes.find((outcome) => outcome.status === "rejected");
    if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
  }

  /** {@linkcode PastView.read} with synchronous reads, one piece after the other. */
  readSync(offsetBytes: number, buffer: Uint8Array): void {
    this.#walk(offsetBytes, buffer, (target, source, position, entryOffsetBytes) => {
      if (source === undefined) return target.fill(0);
      if (entryOffsetBytes !== undefined && this.#verifyPayloads) {
        this.#verifyEntrySync(source, entryOffsetBytes);
      }
      readFully(source.fd, target, target.length, position);
    });
  }

  /**
   * Cuts the read of `buffer.length` bytes at `offsetBytes` into pieces and calls `visit` for
   * each, in order: zeroes (no source), base ranges (the base, no entry) and entry payloads.
   */
  #walk(
    offsetBytes: number,
    buffer: Uint8Array,
    visit: (
      target: Uint8Array,
      source: Source | undefined,
      position: number,
      entry?: number,
    ) => void,
  ): void {
    assert(!this.#closed, "read from a closed PastView");
    const end = offsetBytes + buffer.length;
    assert(
      Number.isSafeInteger(offsetBytes) && offsetBytes >= 0 && end <= this.sizeBytes,
      `read ${offsetBytes}+${buffer.length} outside the ${this.sizeBytes}-byte device`,
    );
    const starts = this.#starts;
    let index = this.#firstEndingAfter(offsetBytes);
    let position = offsetBytes;
    while (position < end) {
      const done = position - offsetBytes;
      if (index < starts.length && starts[index] <= position) {
        const pieceEnd = Math.min(end, starts[index] + this.#lengths[index]);
        const target = buffer.subarray(done, done + pieceEnd - position);
        const sourceIndex = this.#sourceIndexes[index];
        if (sourceIndex < 0) visit(target, undefined, 0);
        else {
          const from = this.#sourceOffsets[index] + (position - starts[index]);
          visit(target, this.#sources[sourceIndex], from, this.#entryOffsets[index]);
        }
        position = pieceEnd;
        index++;
      } else {
        const gapEnd = index < starts.length ? Math.min(end, starts[index]) : end;
        visit(buffer.subarray(done, done + gapEnd - position), this.#base, position);
        position = gapEnd;
      }
    }
  }

  /** Index of the first extent that ends after `offsetBytes`. */
  #firstEndingAfter(offsetBytes: number): number {
    let low = 0;
    let high = this.#starts.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (this.#starts[middle] + this.#lengths[middle] <= offsetBytes) low = middle + 1;
      else high = middle;
    }
    return low;
  }

  /**
   * Checks the payload checksum of the entry at `entryOffsetBytes` once per view; concurrent
   * reads of one entry share the check, and a failed check fails every later read of the entry.
   */
  #verifyEntry(source: Source, entryOffsetBytes: number): Promise<void> {
    if (source.verified.has(entryOffsetBytes)) return Promise.resolve();
    let check = source.checking.get(entryOffsetBytes);
    if (check === undefined) {
      check = (async () => {
        const headerBytes = new Uint8Array(ENTRY_HEADER_BYTES);
        await preadFully(source.fd, headerBytes, entryOffsetBytes);
        const header = decodeHeaderAt(source, headerBytes, entryOffsetBytes);
        const payload = new Uint8Array(header.payloadBytes);
        await preadFully(source.fd, payload, entryOffsetBytes + ENTRY_HEADER_BYTES);
        checkPayload(source, header, payload, entryOffsetBytes);
        source.verified.add(entryOffsetBytes);
        source.checking.delete(entryOffsetBytes);
      })();
      source.checking.set(entryOffsetBytes, check);
    }
    return check;
  }

  #verifyEntrySync(source: Source, entryOffsetBytes: number): void {
    if (source.verified.has(entryOffsetBytes)) return;
    const headerBytes = new Uint8Array(ENTRY_HEADER_BYTES);
    readFully(source.fd, headerBytes, ENTRY_HEADER_BYTES, entryOffsetBytes);
    const header = decodeHeaderAt(source, headerBytes, entryOffsetBytes);
    const bytes = ENTRY_HEADER_BYTES + header.payloadBytes;
    if (this.#scratch.length < bytes) this.#scratch = new Uint8Array(bytes);
    readFully(source.fd, this.#scratch, bytes, entryOffsetBytes);
    checkPayload(
      source,
      header,
      this.#scratch.subarray(ENTRY_HEADER_BYTES, bytes),
      entryOffsetBytes,
    );
    source.verified.add(entryOffsetBytes);
  }

  /**
   * The ranges of the view that differ from the base snapshot, as the index holds them: data
   * (from a level or a segment) or zeroes. Adjacent pieces of one entry are merged.
   */
  *indexedRanges(): Generator<{ offsetBytes: number; lengthBytes: number; zero: boolean }> {
    for (let i = 0; i < this.#starts.length; i++) {
      yield {
        offsetBytes: this.#starts[i],
        lengthBytes: this.#lengths[i],
        zero: this.#sourceIndexes[i] < 0,
      };
    }
  }

  /** Refused: a past view is read-only (the NBD server answers EPERM before calling this). */
  write(_offsetBytes: number, _data: Uint8Array, _options?: BackendWriteOptions): Promise<void> {
    return Promise.reject(readOnlyError());
  }
  /** Refused: a past view is read-only. */
  zero(_offsetBytes: number, _lengthBytes: number, _options?: BackendZeroOptions): Promise<void> {
    return Promise.reject(readOnlyError());
  }
  /** Refused: a past view is read-only. */
  trim(_offsetBytes: number, _lengthBytes: number, _options?: BackendWriteOptions): Promise<void> {
    return Promise.reject(readOnlyError());
  }
  /** Nothing to make durable. */
  flush(): Promise<void> {
    return Promise.resolve();
  }

  /** Closes every file the view holds. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const source of [this.#base, ...this.#sources]) fs.closeSync(source.fd);
  }

  /** Same as {@linkcode PastView.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}

function decodeHeaderAt(source: Source, bytes: Uint8Array, entryOffsetBytes: number): EntryHeader {
  const decoded = decodeEntryHeader(bytes);
  if (!decoded.ok) {
    throw new IntegrityError(
      `Corrupt entry in ${source.path} at offset ${entryOffsetBytes}: ${decoded.problem}`,
      { path: source.path, offsetBytes: entryOffsetBytes },
    );
  }
  return decoded.header;
}

function checkPayload(
  source: Source,
  header: EntryHeader,
  payload: Uint8Array,
  entryOffsetBytes: number,
): void {
  if (!payloadMatches(header, payload)) {
    throw new IntegrityError(
      `Corrupt entry in ${source.path} at offset ${entryOffsetBytes}: bad payload checksum`,
      { path: source.path, offsetBytes: entryOffsetBytes },
    );
  }
}

/** Reads exactly `target.length` bytes at `position` on the thread pool, looping on short reads. */
function preadFully(fd: number, target: Uint8Array, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = () => {
      fs.read(fd, target, done, target.length - done, position + done, (error, count) => {
        if (error !== null) return reject(error);
        if (count === 0) {
          return reject(new Error(`Unexpected end of file at offset ${position + done}`));
        }
        done += count;
        if (done < target.length) step();
        else resolve();
      });
    };
    step();
  });
}

function readOnlyError(): UsageError {
  return new UsageError("Cannot write to a view of the past: it is read-only");
}

/** The files the index points into, each opened once, by path. */
class SourceTable {
  list: Source[] = [];
  baseFd: number | undefined;
  #byPath = new Map<string, number>();

  /** The index of `path` in {@linkcode list}, opening it the first time. */
  indexOf(path: string): number {
    let index = this.#byPath.get(path);
    if (index === undefined) {
      index = this.list.length;
      this.list.push({ path, fd: openLogFile(path), verified: new Set(), checking: new Map() });
      this.#byPath.set(path, index);
    }
    return index;
  }

  closeAll(): void {
    for (const source of this.list) fs.closeSync(source.fd);
    if (this.baseFd !== undefined) fs.closeSync(this.baseFd);
    this.list = [];
    this.baseFd = undefined;
  }
}

function openLogFile(path: string): number {
  try {
    return fs.openSync(path, "r");
  } catch (error) {
    if ((error as { code?: string }).code !== "ENOENT") throw error;
    throw new IntegrityError(`Cannot open ${path}: it is missing`, { path, cause: error });
  }
}

function openBase(logdir: string, manifest: Manifest): Source {
  const path = join(logdir, manifest.base.file);
  const fd = openLogFile(path);
  const sizeBytes = fs.fstatSync(fd).size;
  if (sizeBytes !== manifest.deviceBytes) {
    fs.closeSync(fd);
    throw new IntegrityError(
      `Base snapshot ${path} is ${sizeBytes} bytes, the manifest says ${manifest.deviceBytes}`,
      { path, offsetBytes: Math.min(sizeBytes, manifest.deviceBytes) },
    );
  }
  return { path, fd, verified: new Set(), checking: new Map() };
}

/** Folds every level of `manifest` into `map`, in order (later levels win). */
async function foldLevels(
  logdir: string,
  manifest: Manifest,
  map: ExtentMap,
  sources: SourceTable,
): Promise<void> {
  for (const level of manifest.levels) {
    const path = join(logdir, LEVELS_DIR, level.file);
    const sourceIndex = sources.indexOf(path);
    const scanner = new SegmentScanner(path, {
      tolerateTornTail: false,
      endBytes: level.sizeBytes,
      headersOnly: true,
    });
    for await (const { header, fileOffsetBytes } of scanner.entries()) {
      checkEntryInDevice(header, manifest, path, fileOffsetBytes);
      if (header.kind === "write" || header.kind === "zero") {
        map.set(extentOfEntry(header, fileOffsetBytes, sourceIndex));
      }
    }
  }
}

/**
 * Folds the log's entries up to the restore point into `map`. Every segment of the manifest is
 * opened before the scan, so that the descriptors and the scan see the same files.
 */
async function foldEntries(
  logdir: string,
  point: RestorePoint,
  map: ExtentMap,
  sources: SourceTable,
): Promise<number> {
  const manifest = point.timeline.manifest;
  const fromSeq = point.timeline.applyFromSeq;
  if (point.targetSeq < fromSeq) return 0;
  for (const segment of await listSegments(logdir, manifest)) sources.indexOf(segment.path);
  let indexed = 0;
  for await (const entry of readLogEntries(logdir, manifest, { fromSeq, headersOnly: true })) {
    const { header, fileOffsetBytes } = entry;
    if (header.seq > point.targetSeq) break;
    indexed++;
    if (header.kind !== "write" && header.kind !== "zero" && header.kind !== "trim") continue;
    checkEntryInDevice(header, manifest, entry.segmentPath, fileOffsetBytes);
    map.set(extentOfEntry(header, fileOffsetBytes, sources.indexOf(entry.segmentPath)));
  }
  if (indexed < point.targetSeq - fromSeq + 1) {
    throw new IntegrityError(
      `Cannot open a view of ${logdir} at seq ${point.targetSeq}: the log ends at seq ${
        fromSeq + indexed - 1
      }`,
    );
  }
  return indexed;
}

/**
 * The map's extents in offset order, with the bucket-sized pieces of one entry joined again and
 * adjacent zeroes merged, so a sequential read costs one pread per entry, not per bucket.
 */
function mergeExtents(map: ExtentMap): Extent[] {
  const merged: Extent[] = [];
  for (const extent of map.extents()) {
    const last = merged.at(-1);
    if (
      last !== undefined && last.kind === extent.kind &&
      last.offsetBytes + last.lengthBytes === extent.offsetBytes &&
      (extent.kind === "zero" ||
        (last.sourceIndex === extent.sourceIndex &&
          last.entryOffsetBytes === extent.entryOffsetBytes &&
          last.sourceOffsetBytes + last.lengthBytes === extent.sourceOffsetBytes))
    ) {
      merged[merged.length - 1] = { ...last, lengthBytes: last.lengthBytes + extent.lengthBytes };
    } else {
      merged.push(extent);
    }
  }
  return merged;
}

/**
 * True when opening failed because a compaction replaced files meanwhile: the error is an
 * integrity problem (a missing file, a short scan) and the manifest now names other files.
 */
async function filesReplaced(logdir: string, used: Manifest, error: unknown): Promise<boolean> {
  if (!(error instanceof IntegrityError)) return false;
  try {
    const now = await readManifest(logdir);
    return JSON.stringify([now.base, now.levels, now.segments]) !==
      JSON.stringify([used.base, used.levels, used.segments]);
  } catch {
    return false;
  }
}
