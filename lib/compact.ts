/**
 * Compaction (claim 38, DESIGN.md invariant 6): every entry at or before a cut is folded into one
 * compacted level that holds, for every byte range those entries touched, only its latest state
 * as of the cut. Earlier entries that later ones cover are dropped, partly covered ones are
 * trimmed to what is still visible, zero and trim supersede like writes. The horizon moves to the
 * cut; entries after it are untouched, so `restore --at T` gives the same bytes for every T at or
 * after the new horizon.
 *
 * ```text
 * base + level  == the device after entry level.cutSeq
 * levels/<16 hex cutSeq>.lvl   entries in the segment format: write (≤ 1 MiB) and zero only,
 *                              seq 1..n local to the level, time = the original entry's time,
 *                              in device offset order
 * ```
 *
 * Crash safety: new files are written under a temporary name, fsynced and renamed; then the
 * manifest is swapped under the manifest lock (a running writer may have sealed more segments
 * meanwhile: they are kept); then the old files are removed. Killed at any point, the logdir is in
 * the old or the new state, and the next run removes what the dead one left behind.
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "./_assert.ts";
import { crc32c, crc32cCombine } from "./checksum.ts";
import { requestSeal } from "./control.ts";
import { BusyError, IntegrityError, UsageError } from "./errors.ts";
import {
  checkEntryInDevice,
  type Extent,
  ExtentMap,
  extentOfEntry,
  LEVEL_WRITE_BYTES_MAX,
  levelRuns,
  measureLevel,
} from "./extent_map.ts";
import {
  decodeEntryHeader,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  makeEntryHeader,
  payloadMatches,
} from "./format/entry.ts";
import {
  durableBytesOf,
  LEVELS_DIR,
  listSegments,
  LogdirLock,
  MANIFEST_FILE,
  readLogdirSyncRecord,
  readManifest,
  removeIfExists,
  SEGMENTS_DIR,
  syncDirectory,
  withManifestLock,
  writeManifest,
} from "./format/logdir.ts";
import { LogdirWriter } from "./format/logdir_writer.ts";
import {
  type CompactedMark,
  type LevelInfo,
  type Manifest,
  nextSeqAfterSealed,
  type SegmentInfo,
} from "./format/manifest.ts";
import {
  parseSegmentFileName,
  SegmentAppender,
  segmentFileName,
  SegmentScanner,
} from "./format/segment.ts";
import { realStorage } from "./storage/real_storage.ts";
import { readFully, type Storage, type StorageFile, StorageNotFound } from "./storage/storage.ts";
import { formatTimeUtc, nowUs } from "./time.ts";
import { applyFromSeq } from "./timeline.ts";

/** The lock a compaction holds (flock), so that two never run on one logdir. Holds the pid. */
export const COMPACT_LOCK_FILE = "compact.lock";
/**
 * The points of a compaction after which a crash leaves a distinct state on disk, in order. A run
 * passes every one of them, also when it had nothing to write at that step.
 */
export const COMPACT_STEPS = [
  "sealed",
  "level-written",
  "level-renamed",
  "segment-written",
  "segment-renamed",
  "manifest-swapped",
  "old-file-removed",
  "old-files-removed",
] as const;
/** One of {@linkcode COMPACT_STEPS}. */
export type CompactStep = (typeof COMPACT_STEPS)[number];

/** Suffix of files a compaction is still writing; any found by the next run are leftovers. */
const TEMP_SUFFIX = ".compact-tmp";
const LEVEL_NAME_PATTERN = /^[0-9a-f]{16}\.lvl$/;
/** Buffer for copying the kept tail of a segment. */
const COPY_BUFFER_BYTES = 4 * 1024 * 1024;
/** Source files kept open at once while a level is written. */
const SOURCE_FDS_MAX = 64;
/** Buffer for checksumming the bytes of a kept source entry that later entries overwrote. */
const HIDDEN_BUFFER_BYTES = 1024 * 1024;
/** Initial capacity of the checksum table of one source file. */
const ENTRY_CHECKSUMS_MIN = 1024;
/** Level bytes written between two background fdatasyncs of the level being written. */
const LEVEL_SYNC_BYTES = 32 * 1024 * 1024;
/** Entries folded between two progress reports. */
const PROGRESS_ENTRIES = 1024;

/** The file name of the level that folds every entry up to `cutSeq`: `00000000000004d2.lvl`. */
export function levelFileName(cutSeq: number): string {
  return `${cutSeq.toString(16).padStart(16, "0")}.lvl`;
}

/** Options of {@linkcode compactLogdir}. */
export interface CompactOptions {
  /** The cut: fold every entry with a time at or before it (µs since the epoch). */
  cutUs: number;
  /**
   * If the logdir is still larger than this after the cut, move the cut forward until it fits
   * (reported in {@linkcode CompactResult.maxBytes} and a warning).
   */
  maxBytes?: number;
  /** Keep marks restorable: move the cut back to just before the earliest mark it would lose. */
  keepMarks?: boolean;
  /** Plan and measure only; change nothing (no lock, no seal, no files). */
  dryRun?: boolean;
  /** The present, for refusing cuts in the future (default: the wall clock). */
  nowUs?: number;
  /** Called as entries are folded and level bytes written; the total is an estimate. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Called after each of {@linkcode COMPACT_STEPS} (the CLI's crash-test hook uses it). */
  onStep?: (step: CompactStep) => void;
  /**
   * Seal the live segment first (default true). Off for a logdir that has no writer and no live
   * segment, such as the temporary copy of one in object storage.
   */
  sealLive?: boolean;
  /** Where the logdir lives (default: the local filesystem). */
  storage?: Storage;
  /**
   * How to ask the writer that holds the logdir (a running `watch`) to seal; undefined when none
   * listens. Default: its control socket.
   */
  requestSeal?: (logdir: string) => Promise<{ nextSeq: number } | undefined>;
}

/** What `--max-bytes` did. */
export interface CompactMaxBytes {
  limitBytes: number;
  /** True when the cut was moved forward past the requested one to fit. */
  movedCut: boolean;
  /** True when the logdir fits the limit after compaction. */
  fits: boolean;
}

/** What `--keep-marks` did. */
export interface CompactKeepMarks {
  /** The marks kept restorable by moving the cut back. */
  marks: string[];
  /** The cut that would have been used without `--keep-marks`. */
  cutWithoutUs: number;
  /** Bytes the logdir keeps for those marks (measured by dry runs only). */
  costBytes?: number;
}

/** What {@linkcode compactLogdir} did (or, for a dry run, would do). */
export interface CompactResult {
  logdir: string;
  dryRun: boolean;
  /** False when there was nothing to do: the logdir is unchanged. */
  changed: boolean;
  requestedCutUs: number;
  /** The cut used: the requested one, moved back by `keepMarks` or forward by `maxBytes`. */
  cutUs: number;
  /** Every entry up to this seq is folded into the level. */
  cutSeq: number;
  previousHorizonUs: number;
  /** The earliest restorable time after compaction. */
  horizonUs: number;
  /** Entries of the log folded into the level by this run. */
  foldedEntries: number;
  /** Entries and bytes of the level after the run. */
  levelEntries: number;
  levelBytes: number;
  /** Entries and bytes of the levels and sealed segments compaction worked on, before and after. */
  entriesBefore: number;
  entriesAfter: number;
  bytesBefore: number;
  bytesAfter: number;
  reclaimedBytes: number;
  /** Base data + levels + every segment file (sealed and live), before and after. */
  logdirBytesBefore: number;
  logdirBytesAfter: number;
  /** Marks folded by this run: listed in the manifest, no longer restorable. */
  compactedMarks: CompactedMark[];
  /** Who sealed the live segment before the fold ("none": only already sealed entries folded). */
  sealedVia: "compact" | "watch" | "none";
  /** Why the live segment was not sealed, when it was not. */
  sealNote?: string;
  maxBytes?: CompactMaxBytes;
  keepMarks?: CompactKeepMarks;
  /** Things a person should know even from cron (the CLI always prints them). */
  warnings: string[];
  /** Files a crashed earlier run left behind, removed by this one. */
  removedLeftovers: string[];
  durationMs: number;
}

/**
 * Folds the history of `logdir` at or before `options.cutUs` into its compacted level and moves
 * the horizon there. Takes `logdir/compact.lock` (a second compaction gets a {@linkcode BusyError}
 * at once), seals the live segment (directly, or through a running `watch`), and only ever reads
 * or replaces sealed segments, so it runs while a writer appends.
 *
 * @example
 * ```ts
 * import { compactLogdir } from "./compact.ts";
 * import { nowUs, parseDuration } from "./time.ts";
 * const result = await compactLogdir("/var/lib/sectorlog/vm1", {
 *   cutUs: nowUs() - parseDuration("7d"),
 * });
 * console.log(`reclaimed ${result.reclaimedBytes} bytes`);
 * ```
 */
export async function compactLogdir(
  logdir: string,
  options: CompactOptions,
): Promise<CompactResult> {
  const startedMs = performance.now();
  const presentUs = options.nowUs ?? nowUs();
  if (!Number.isSafeInteger(options.cutUs) || options.cutUs > presentUs) {
    throw new UsageError(
      `Cannot compact ${logdir} up to ${formatCut(options.cutUs)}: the cut is in the future`,
      { hint: "use --keep DURATION, or --before a time that has passed" },
    );
  }
  const storage = options.storage ?? realStorage;
  if (options.dryRun === true) {
    const manifest = await readManifest(logdir, storage);
    const plan = await planCompaction(logdir, manifest, options, { includeLive: true });
    return finish(plan, { dryRun: true, startedMs });
  }
  // A clear error for a logdir that is not one, before any lock file.
  await readManifest(logdir, storage);
  const lock = await LogdirLock.acquire(logdir, "compact", {
    file: COMPACT_LOCK_FILE,
    heldBy: "another compaction is running",
    storage,
  });
  try {
    const removedLeftovers = await removeLeftovers(logdir, storage);
    const seal: SealOutcome = options.sealLive === false
      ? { via: "none" }
      : await sealLiveSegment(logdir, "compact", options);
    options.onStep?.("sealed");
    const manifest = await readManifest(logdir, storage);
    try {
      const plan = await planCompaction(logdir, manifest, options, { includeLive: false });
      plan.seal = seal;
      plan.removedLeftovers = removedLeftovers;
      const outcome = await executePlan(logdir, plan, options);
      return finish(plan, { dryRun: false, startedMs, outcome });
    } catch (error) {
      // A file gone because a new base replaced the one planned for is no corruption.
      if (!(error instanceof IntegrityError)) throw error;
      const now = await readManifest(logdir, storage).catch(() => undefined);
      if (now === undefined || now.base.file === manifest.base.file) throw error;
      throw new BusyError(
        `Cannot compact ${logdir}: a new base snapshot was installed while compaction ran; nothing was changed, run compact again`,
      );
    }
  } finally {
    lock.release();
  }
}

function formatCut(cutUs: number): string {
  return Number.isSafeInteger(cutUs) ? formatTimeUtc(cutUs) : String(cutUs);
}

// ---------------------------------------------------------------------------------------------
// Sealing: bring every entry so far into sealed segments, if the writer lets us.

/** How {@linkcode sealLiveSegment} went: who sealed, or why nothing was. */
export interface SealOutcome {
  /** `compact`: this process opened the logdir as its writer and rotated. */
  via: CompactResult["sealedVia"];
  note?: string;
  warning?: string;
}

/**
 * Seals the live segment: through the control socket of a running `watch`, or by opening the
 * logdir as its writer for a moment when nobody holds it. When another process holds the lock
 * and does not answer (a `receive`, a `mark`), only what is already sealed is folded. A log whose
 * unsealed entries a watch must still replay onto its device is left alone: sealing them would
 * hide them from that replay.
 */
export async function sealLiveSegment(
  logdir: string,
  purpose = "compact",
  options: Pick<CompactOptions, "storage" | "requestSeal"> = {},
): Promise<SealOutcome> {
  const storage = options.storage ?? realStorage;
  let lock: LogdirLock;
  try {
    lock = await LogdirLock.acquire(logdir, purpose, { storage });
  } catch (error) {
    if (!(error instanceof BusyError)) throw error;
    return await sealThroughWriter(logdir, error, options.requestSeal ?? requestSeal);
  }
  try {
    // The writer recovers the logdir as any writer does; it never seals what a watch must still
    // replay onto its device (that would hide those entries from the replay).
    const writer = await LogdirWriter.open(logdir, { purpose, lock, storage });
    try {
      if (writer.hasReplayDebt) {
        return {
          via: "none" as const,
          warning: `The unsealed entries of ${logdir} include writes that a watch must still ` +
            `re-apply to its device (it stopped without a clean close); they are folded once ` +
            `a watch has replayed them onto the device (folding sealed entries only)`,
        };
      }
      await writer.rotate();
      return { via: "compact" };
    } finally {
      await writer.close();
    }
  } finally {
    lock.release();
  }
}

/** Asks the writer that holds the lock (`busy` says who) to seal, if it listens. */
async function sealThroughWriter(
  logdir: string,
  busy: BusyError,
  request: (logdir: string) => Promise<{ nextSeq: number } | undefined>,
): Promise<SealOutcome> {
  try {
    if (await request(logdir) !== undefined) return { via: "watch" };
  } catch (refusal) {
    return { via: "none", warning: `${(refusal as Error).message}; folding sealed entries only` };
  }
  return {
    via: "none",
    note: `${busy.message}, and it answers no seal request: folding sealed entries only`,
  };
}

function isChange(header: EntryHeader): boolean {
  return header.kind === "write" || header.kind === "zero" || header.kind === "trim";
}

// ---------------------------------------------------------------------------------------------
// Planning: which entries fold, and what the level holds.

/** A segment file the fold reads. */
interface SourceSegment {
  path: string;
  firstSeq: number;
  /** Bytes to read (the manifest's size for sealed segments, the size at planning for live). */
  endBytes: number;
  entries: number;
  /** The manifest's record; undefined for a live segment (dry runs only). */
  info?: SegmentInfo;
}

interface MarkRef {
  sourceIndex: number;
  fileOffsetBytes: number;
  header: EntryHeader;
}

interface FoldResult {
  map: ExtentMap;
  /** Paths by source index: the levels first, then the segments. */
  sourcePaths: string[];
  /** The cut, moved forward by maxBytes if it had to. */
  cutUs: number;
  cutSeq: number;
  lastFoldedUs: number | undefined;
  foldedEntries: number;
  /** Entries of the segments whose bytes the new files no longer need (folded or older). */
  consumedEntries: number;
  consumedBytes: number;
  /** The first segment not folded whole, and the offset of its first kept entry. */
  stopIndex: number;
  stopOffsetBytes: number;
  /** Time of the first entry after the cut among the sources. */
  nextEntryUs: number | undefined;
  marks: MarkRef[];
  /** The payload checksums of the write entries folded, by source index. */
  checksums: EntryChecksums[];
}

interface CompactPlan {
  logdir: string;
  storage: Storage;
  manifest: Manifest;
  segments: SourceSegment[];
  requestedCutUs: number;
  /** The cut before `maxBytes` moved it forward. */
  plannedCutUs: number;
  maxBytes?: number;
  fold: FoldResult;
  /** Marks the fold removes from the log, with their names (read before any file changes). */
  foldedMarks: CompactedMark[];
  /** Levels and segments worked on: entries and bytes before. */
  entriesBefore: number;
  bytesBefore: number;
  logdirBytesBefore: number;
  keepMarks?: CompactKeepMarks;
  warnings: string[];
  seal?: SealOutcome;
  removedLeftovers: string[];
}

async function planCompaction(
  logdir: string,
  manifest: Manifest,
  options: CompactOptions,
  scope: { includeLive: boolean },
): Promise<CompactPlan> {
  const storage = options.storage ?? realStorage;
  const segments = await sourceSegments(storage, logdir, manifest, scope.includeLive);
  const levels = levelTotals(manifest);
  const logdirBytesBefore = await measureLogdirBytes(storage, logdir, manifest);
  const warnings: string[] = [];
  let cutUs = Math.max(options.cutUs, manifest.horizonUs);
  let keepMarks: CompactKeepMarks | undefined;
  if (options.keepMarks === true) {
    const marks = findMarks(storage, segments, applyFromSeq(manifest), manifest.horizonUs, cutUs);
    if (marks.length > 0) {
      keepMarks = { marks: marks.map((mark) => mark.name), cutWithoutUs: cutUs };
      cutUs = Math.max(manifest.horizonUs, marks[0].timeUs - 1);
    }
  }
  const foldInput = { logdir, storage, manifest, segments, logdirBytesBefore, options };
  const fold = foldEntries({ ...foldInput, cutUs });
  if (keepMarks !== undefined && options.dryRun === true) {
    const without = foldEntries({ ...foldInput, cutUs: keepMarks.cutWithoutUs });
    keepMarks.costBytes = foldDeltaBytes(manifest, fold) - foldDeltaBytes(manifest, without);
  }
  if (keepMarks !== undefined && fold.cutUs > cutUs) {
    const lost = (findMarks(storage, segments, applyFromSeq(manifest), cutUs, fold.cutUs))
      .map((mark) => mark.name);
    if (lost.length > 0) {
      warnings.push(
        `--max-bytes moved the cut past marks that --keep-marks would keep: ${lost.join(", ")}`,
      );
    }
  }
  return {
    logdir,
    storage,
    manifest,
    segments,
    requestedCutUs: options.cutUs,
    plannedCutUs: cutUs,
    maxBytes: options.maxBytes,
    fold,
    foldedMarks: readMarkNames(storage, fold.marks, fold.sourcePaths),
    entriesBefore: levels.entries + segments.reduce((sum, s) => sum + s.entries, 0),
    bytesBefore: levels.sizeBytes + segments.reduce((sum, s) => sum + s.endBytes, 0),
    logdirBytesBefore,
    keepMarks,
    warnings,
    removedLeftovers: [],
  };
}

/** The sealed segments of `manifest`, and for dry runs the live ones after them. */
async function sourceSegments(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
  includeLive: boolean,
): Promise<SourceSegment[]> {
  const refs = await listSegments(logdir, manifest, storage);
  const sources: SourceSegment[] = [];
  const record = readLogdirSyncRecord(logdir, storage);
  let expectedSeq = nextSeqAfterSealed(manifest);
  for (const ref of refs) {
    if (ref.info !== undefined) {
      sources.push({
        path: ref.path,
        firstSeq: ref.firstSeq,
        endBytes: ref.info.sizeBytes,
        entries: ref.info.entries,
        info: ref.info,
      });
    } else if (includeLive && ref.firstSeq === expectedSeq) {
      // A dry run folds the unsealed entries too, up to the end of the log as a reader sees it.
      const durableBytes = durableBytesOf(record, ref);
      const scanner = new SegmentScanner(ref.path, {
        storage,
        tolerateTornTail: true,
        durableBytes,
        headersOnly: true,
        payloadsFromBytes: durableBytes,
      });
      let entries = 0;
      let endBytes = 0;
      for await (const { header, fileOffsetBytes } of scanner.entries()) {
        if (header.seq !== expectedSeq) break;
        expectedSeq++;
        entries++;
        endBytes = fileOffsetBytes + ENTRY_HEADER_BYTES + header.payloadBytes;
      }
      sources.push({ path: ref.path, firstSeq: ref.firstSeq, endBytes, entries });
      if (endBytes < (storage.stat(ref.path)?.sizeBytes ?? 0)) break;
    }
  }
  return sources;
}

/** Base data + levels + every segment file: what `--max-bytes` limits. */
async function measureLogdirBytes(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
): Promise<number> {
  let bytes = manifest.base.dataBytes;
  for (const level of manifest.levels) bytes += level.sizeBytes;
  for (const ref of await listSegments(logdir, manifest, storage)) {
    // A live segment sealed and renamed meanwhile is counted by its manifest entry.
    bytes += ref.info?.sizeBytes ?? storage.stat(ref.path)?.sizeBytes ?? 0;
  }
  return bytes;
}

/** How many bytes folding as `fold` says adds to the logdir (negative: reclaims), exactly. */
function foldDeltaBytes(manifest: Manifest, fold: FoldResult): number {
  if (fold.foldedEntries === 0) return 0;
  return measureLevel(fold.map).sizeBytes - levelTotals(manifest).sizeBytes - fold.consumedBytes;
}

/** Entries and bytes of the levels of `manifest`. */
function levelTotals(manifest: Manifest): { entries: number; sizeBytes: number } {
  let entries = 0;
  let sizeBytes = 0;
  for (const level of manifest.levels) {
    entries += level.entries;
    sizeBytes += level.sizeBytes;
  }
  return { entries, sizeBytes };
}

interface NamedMark {
  name: string;
  seq: number;
  timeUs: number;
}

/** Marks with seq ≥ `fromSeq` and time in (afterUs, upToUs], in log order (headers, then names). */
function findMarks(
  storage: Storage,
  segments: SourceSegment[],
  fromSeq: number,
  afterUs: number,
  upToUs: number,
): NamedMark[] {
  const refs: MarkRef[] = [];
  scan: for (const [index, segment] of segments.entries()) {
    const headers = wholeHeaders(storage, segment.path, segment.endBytes);
    for (const { header, fileOffsetBytes } of headers) {
      if (header.timeUs > upToUs) break scan;
      if (header.kind !== "mark" || header.seq < fromSeq || header.timeUs <= afterUs) continue;
      refs.push({ sourceIndex: index, fileOffsetBytes, header });
    }
  }
  return readMarkNames(storage, refs, segments.map((segment) => segment.path));
}

/** Most bytes {@linkcode wholeHeaders} reads at once. */
const HEADER_WINDOW_BYTES = 256 * 1024;
/**
 * Entries up to this size on average are scanned a window at a time, larger ones a header pread
 * each: a pread costs about as much as copying 6 KiB (≈ 1.1 µs and ≈ 0.16 µs per KiB from a warm
 * page cache, measured with Deno 2.9 on the bench machine).
 */
const WINDOWED_ENTRY_BYTES_MAX = 6 * 1024;

function corruptEntry(path: string, offsetBytes: number, problem: string): IntegrityError {
  return new IntegrityError(`Corrupt entry in ${path} at offset ${offsetBytes}: ${problem}`, {
    path,
    offsetBytes,
  });
}

/**
 * The headers of a file of whole entries up to `endBytes` (a sealed segment, a level, or the
 * valid part of a live segment), checked strictly. Small entries are read a window at a time, so
 * a scan costs one syscall per window instead of one per entry (a pread costs more than reading
 * the payloads between a window's headers); after a large entry, only the next header is read.
 */
function* wholeHeaders(
  storage: Storage,
  path: string,
  endBytes: number,
): Generator<{ header: EntryHeader; fileOffsetBytes: number }> {
  const file = openSource(storage, path);
  try {
    const fileBytes = file.sizeBytes();
    if (fileBytes < endBytes) {
      throw new IntegrityError(
        `File ${path} is ${fileBytes} bytes, expected ${endBytes}: it was truncated`,
        { path, offsetBytes: fileBytes },
      );
    }
    const window = new Uint8Array(HEADER_WINDOW_BYTES);
    let windowStart = 0;
    let windowBytes = 0;
    let entryBytes = 0;
    let averageEntryBytes = 0; // moving average over the last ~8 entries
    for (let position = 0; position < endBytes; position += entryBytes) {
      if (endBytes - position < ENTRY_HEADER_BYTES) {
        throw corruptEntry(path, position, "incomplete entry header");
      }
      if (position + ENTRY_HEADER_BYTES > windowStart + windowBytes) {
        const wanted = averageEntryBytes <= WINDOWED_ENTRY_BYTES_MAX
          ? HEADER_WINDOW_BYTES
          : ENTRY_HEADER_BYTES;
        windowBytes = Math.min(wanted, endBytes - position);
        windowStart = position;
        readFully(file, window, windowBytes, position);
      }
      const decoded = decodeEntryHeader(window, position - windowStart);
      if (!decoded.ok) throw corruptEntry(path, position, decoded.problem);
      const header = decoded.header;
      if (header.payloadBytes > endBytes - position - ENTRY_HEADER_BYTES) {
        throw corruptEntry(path, position, "entry extends past end of file");
      }
      yield { header, fileOffsetBytes: position };
      entryBytes = ENTRY_HEADER_BYTES + header.payloadBytes;
      averageEntryBytes += (entryBytes - averageEntryBytes) / 8;
    }
  } finally {
    file.close();
  }
}

/** Opens a file the fold reads; one that is gone is a hole in the log (exit 3). */
function openSource(storage: Storage, path: string): StorageFile {
  try {
    return storage.open(path);
  } catch (error) {
    if (!(error instanceof StorageNotFound)) throw error;
    throw new IntegrityError(`${path} is missing`, { path, cause: error });
  }
}

function readMarkNames(storage: Storage, refs: MarkRef[], sourcePaths: string[]): NamedMark[] {
  const decoder = new TextDecoder();
  return refs.map(({ sourceIndex, fileOffsetBytes, header }) => {
    const path = sourcePaths[sourceIndex];
    const payload = new Uint8Array(header.payloadBytes);
    const file = openSource(storage, path);
    try {
      readFully(file, payload, payload.length, fileOffsetBytes + ENTRY_HEADER_BYTES);
    } finally {
      file.close();
    }
    if (!payloadMatches(header, payload)) {
      throw corruptEntry(path, fileOffsetBytes, "bad payload checksum");
    }
    return { name: decoder.decode(payload), seq: header.seq, timeUs: header.timeUs };
  });
}

// ---------------------------------------------------------------------------------------------
// The fold: old levels, then the entries up to the cut, into one extent map (headers only).

interface FoldInput {
  logdir: string;
  storage: Storage;
  manifest: Manifest;
  segments: SourceSegment[];
  cutUs: number;
  logdirBytesBefore: number;
  options: CompactOptions;
}

function foldEntries(input: FoldInput): FoldResult {
  const { logdir, storage, manifest, segments, options } = input;
  const map = new ExtentMap(manifest.deviceBytes);
  const sourcePaths = manifest.levels.map((level) => join(logdir, LEVELS_DIR, level.file));
  const checksums = [...manifest.levels, ...segments].map(() => new EntryChecksums());
  for (const [index, info] of manifest.levels.entries()) {
    const path = sourcePaths[index];
    foldLevel(storage, map, { path, info, sourceIndex: index, checksums: checksums[index] });
  }
  const result: FoldResult = {
    map,
    sourcePaths: [...sourcePaths, ...segments.map((segment) => segment.path)],
    cutUs: input.cutUs,
    cutSeq: applyFromSeq(manifest) - 1,
    lastFoldedUs: undefined,
    foldedEntries: 0,
    consumedEntries: 0,
    consumedBytes: 0,
    stopIndex: segments.length,
    stopOffsetBytes: 0,
    nextEntryUs: undefined,
    marks: [],
    checksums,
  };
  const levelBytes = levelTotals(manifest).sizeBytes;
  const totalBytes = segments.reduce((sum, segment) => sum + segment.endBytes, 0);
  const order = new OrderCheck();
  for (const [index, segment] of segments.entries()) {
    const headers = wholeHeaders(storage, segment.path, segment.endBytes);
    for (const { header, fileOffsetBytes } of headers) {
      order.check(segment.path, header, fileOffsetBytes);
      const consumedBytes = result.consumedBytes + fileOffsetBytes;
      if (header.seq >= applyFromSeq(manifest) && header.timeUs > result.cutUs) {
        const projected = input.logdirBytesBefore - levelBytes - consumedBytes +
          map.encodedBytesMax;
        if (options.maxBytes === undefined || projected <= options.maxBytes) {
          result.stopIndex = index;
          result.stopOffsetBytes = fileOffsetBytes;
          result.nextEntryUs = header.timeUs;
          result.consumedBytes = consumedBytes;
          return result;
        }
        result.cutUs = header.timeUs; // Entries of the same time fold together: no check until then.
      }
      foldEntry(result, header, fileOffsetBytes, sourcePaths.length + index, manifest);
      if (result.consumedEntries % PROGRESS_ENTRIES === 0) {
        options.onProgress?.(consumedBytes, totalBytes);
      }
    }
    if (segment.info !== undefined) order.checkSealedEnd(segment.path, segment.info);
    result.consumedBytes += segment.endBytes;
  }
  return result;
}

function foldEntry(
  result: FoldResult,
  header: EntryHeader,
  fileOffsetBytes: number,
  sourceIndex: number,
  manifest: Manifest,
): void {
  result.consumedEntries++;
  if (header.seq < applyFromSeq(manifest)) return; // already in the base
  result.foldedEntries++;
  result.cutSeq = header.seq;
  result.lastFoldedUs = header.timeUs;
  if (header.kind === "mark") {
    result.marks.push({ sourceIndex, fileOffsetBytes, header });
    return;
  }
  if (!isChange(header)) return;
  checkEntryInDevice(header, manifest, result.sourcePaths[sourceIndex], fileOffsetBytes);
  result.map.set(extentOfEntry(header, fileOffsetBytes, sourceIndex));
  if (header.kind === "write") result.checksums[sourceIndex].add(fileOffsetBytes, header);
}

function foldLevel(
  storage: Storage,
  map: ExtentMap,
  level: { path: string; info: LevelInfo; sourceIndex: number; checksums: EntryChecksums },
): void {
  const { path, info, sourceIndex } = level;
  let entries = 0;
  for (const { header, fileOffsetBytes } of wholeHeaders(storage, path, info.sizeBytes)) {
    entries++;
    if (header.kind !== "write" && header.kind !== "zero") {
      throw new IntegrityError(
        `Level ${path} holds a ${header.kind} entry at offset ${fileOffsetBytes}: levels hold only write and zero entries`,
        { path, offsetBytes: fileOffsetBytes },
      );
    }
    map.set(extentOfEntry(header, fileOffsetBytes, sourceIndex));
    if (header.kind === "write") level.checksums.add(fileOffsetBytes, header);
  }
  if (entries !== info.entries) {
    throw new IntegrityError(
      `Level ${path} holds ${entries} entries, the manifest says ${info.entries}`,
      { path, offsetBytes: info.sizeBytes },
    );
  }
}

/** Seq increases by one and time never decreases across the segments of the fold. */
class OrderCheck {
  #nextSeq: number | undefined;
  #lastUs = Number.MIN_SAFE_INTEGER;

  check(path: string, header: EntryHeader, fileOffsetBytes: number): void {
    if (this.#nextSeq !== undefined && header.seq !== this.#nextSeq) {
      throw new IntegrityError(
        `Out-of-sequence entry in ${path} at offset ${fileOffsetBytes}: seq ${header.seq}, expected ${this.#nextSeq}`,
        { path, offsetBytes: fileOffsetBytes },
      );
    }
    if (header.timeUs < this.#lastUs) {
      throw new IntegrityError(
        `Time goes backwards in ${path} at offset ${fileOffsetBytes}: seq ${header.seq} has ${header.timeUs} µs, the entry before ${this.#lastUs} µs`,
        { path, offsetBytes: fileOffsetBytes },
      );
    }
    this.#nextSeq = header.seq + 1;
    this.#lastUs = header.timeUs;
  }

  checkSealedEnd(path: string, info: SegmentInfo): void {
    if (this.#nextSeq !== info.lastSeq + 1) {
      throw new IntegrityError(
        `Sealed segment ${path} ends at seq ${
          (this.#nextSeq ?? info.firstSeq) - 1
        }, the manifest says ${info.lastSeq}`,
        { path, offsetBytes: info.sizeBytes },
      );
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Execution: new files, manifest swap, removal of old files.

interface ExecutionOutcome {
  changed: boolean;
  horizonUs: number;
  level?: LevelInfo;
}

async function executePlan(
  logdir: string,
  plan: CompactPlan,
  options: CompactOptions,
): Promise<ExecutionOutcome> {
  const { fold, manifest } = plan;
  const step = options.onStep ?? (() => {});
  if (fold.foldedEntries === 0 && fold.cutUs <= manifest.horizonUs) {
    return { changed: false, horizonUs: manifest.horizonUs };
  }
  const created: string[] = [];
  let level: LevelInfo | undefined;
  let straddle: SegmentInfo | undefined;
  try {
    level = await writeLevel(logdir, plan, options, step, created);
    straddle = await rewriteStraddle(logdir, plan, step, created);
  } catch (error) {
    // Nothing names these files yet. (After the swap began they are left to the next run's
    // leftover sweep: a manifest written but not yet synced may already name them.)
    for (const path of created) removeIfExists(path, plan.storage);
    throw error;
  }
  const swapped = await swapManifest(logdir, plan, level, straddle);
  if (!swapped.changed) return swapped;
  step("manifest-swapped");
  await removeOldFiles(logdir, plan, step);
  return swapped;
}

async function writeLevel(
  logdir: string,
  plan: CompactPlan,
  options: CompactOptions,
  step: (step: CompactStep) => void,
  created: string[],
): Promise<LevelInfo | undefined> {
  if (plan.fold.foldedEntries === 0) {
    step("level-written");
    step("level-renamed");
    return undefined;
  }
  const file = levelFileName(plan.fold.cutSeq);
  const path = join(logdir, LEVELS_DIR, file);
  const tempPath = path + TEMP_SUFFIX;
  created.push(tempPath);
  const written = await writeLevelFile(plan.storage, tempPath, plan.fold, options);
  step("level-written");
  created.push(path);
  plan.storage.rename(tempPath, path);
  await syncDirectory(join(logdir, LEVELS_DIR), plan.storage);
  step("level-renamed");
  return {
    file,
    cutUs: plan.fold.cutUs,
    cutSeq: plan.fold.cutSeq,
    sizeBytes: written.sizeBytes,
    entries: written.entries,
  };
}

/**
 * Writes the level of `fold.map` to `path` and fsyncs it. Each byte of a source entry that keeps
 * any visible byte is checksummed exactly once: the CRCs of its visible pieces both complete the
 * check of the source entry and, combined, are the CRC of the level entry they go into.
 */
async function writeLevelFile(
  storage: Storage,
  path: string,
  fold: FoldResult,
  options: CompactOptions,
): Promise<{ sizeBytes: number; entries: number }> {
  removeIfExists(path, storage);
  const appender = SegmentAppender.open(path, 1, 0, storage);
  const reader = new SourceReader(fold, storage);
  const payload = new Uint8Array(LEVEL_WRITE_BYTES_MAX);
  const totalBytes = fold.map.dataBytes;
  let doneBytes = 0;
  let seq = 0;
  // The disk writes what is written so far while the CPU checksums the rest: the last fdatasync
  // then only has the tail to write.
  let syncing: Promise<void> | undefined;
  let syncStartedAtBytes = 0;
  try {
    for (const run of levelRuns(fold.map)) {
      seq++;
      const fields = {
        seq,
        timeUs: run.timeUs,
        offsetBytes: run.offsetBytes,
        lengthBytes: run.lengthBytes,
      };
      if (run.kind === "zero") {
        appender.append(makeEntryHeader({ kind: "zero", ...fields }));
        continue;
      }
      let at = 0;
      let runCrc = 0;
      for (const piece of run.pieces) {
        const pieceCrc = reader.read(piece, payload.subarray(at, at + piece.lengthBytes));
        runCrc = crc32cCombine(runCrc, pieceCrc, piece.lengthBytes);
        at += piece.lengthBytes;
      }
      const header = {
        kind: "write" as const,
        ...fields,
        payloadBytes: run.lengthBytes,
        payloadCrc32c: runCrc,
      };
      appender.append(header, payload.subarray(0, run.lengthBytes));
      doneBytes += run.lengthBytes;
      if (seq % 64 === 0) options.onProgress?.(doneBytes, totalBytes);
      if (appender.sizeBytes - syncStartedAtBytes >= LEVEL_SYNC_BYTES) {
        await syncing;
        syncing = appender.sync();
        syncing.catch(() => {}); // awaited above or below; a throw in between already failed
        syncStartedAtBytes = appender.sizeBytes;
      }
    }
    reader.checkRest();
    await syncing;
    await appender.sync();
    return { sizeBytes: appender.sizeBytes, entries: seq };
  } finally {
    appender.close();
    reader.close();
  }
}

/** How far the payload check of one source entry has got: the CRC of its first `checkedBytes`. */
interface EntryCheck {
  payloadBytes: number;
  payloadCrc32c: number;
  checkedBytes: number;
  crc: number;
}

/**
 * The payload length and checksum of every write entry of one source file, in file order, as
 * the fold read them from the headers: writing the level then reads no header twice. Columns of
 * typed arrays, because a log of small writes has millions of entries.
 */
class EntryChecksums {
  #offsets = new Float64Array(ENTRY_CHECKSUMS_MIN);
  #payloadBytes = new Uint32Array(ENTRY_CHECKSUMS_MIN);
  #crcs = new Uint32Array(ENTRY_CHECKSUMS_MIN);
  #count = 0;

  /** Records the write entry at `entryOffsetBytes`; offsets must increase. */
  add(entryOffsetBytes: number, header: EntryHeader): void {
    const count = this.#count;
    assert(count === 0 || this.#offsets[count - 1] < entryOffsetBytes, "entries out of order");
    if (count === this.#offsets.length) {
      this.#offsets = grown(this.#offsets, new Float64Array(count * 2));
      this.#payloadBytes = grown(this.#payloadBytes, new Uint32Array(count * 2));
      this.#crcs = grown(this.#crcs, new Uint32Array(count * 2));
    }
    this.#offsets[count] = entryOffsetBytes;
    this.#payloadBytes[count] = header.payloadBytes;
    this.#crcs[count] = header.payloadCrc32c;
    this.#count = count + 1;
  }

  /** A new check of the entry at `entryOffsetBytes`, or undefined if none was recorded there. */
  startCheck(entryOffsetBytes: number): EntryCheck | undefined {
    let low = 0;
    let high = this.#count;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (this.#offsets[middle] < entryOffsetBytes) low = middle + 1;
      else high = middle;
    }
    if (low === this.#count || this.#offsets[low] !== entryOffsetBytes) return undefined;
    return {
      payloadBytes: this.#payloadBytes[low],
      payloadCrc32c: this.#crcs[low],
      checkedBytes: 0,
      crc: 0,
    };
  }
}

function grown<T extends Float64Array | Uint32Array>(from: T, to: T): T {
  to.set(from);
  return to;
}

/**
 * Reads the bytes of data extents from their source files and checks the payload checksum of
 * every entry it reads from (entries of levels and segments alike), so corruption is reported,
 * not copied into the level under a fresh checksum.
 *
 * The level is written in device order, so the pieces of one source entry arrive in payload
 * order: each piece extends the entry's running CRC, the bytes between pieces (overwritten
 * later) are read only to be checksummed, and the entry is checked when its last byte is reached
 * or, for an entry whose end is not visible, by {@linkcode SourceReader.checkRest}.
 */
class SourceReader {
  #paths: string[];
  #checksums: EntryChecksums[];
  #storage: Storage;
  #files = new Map<number, StorageFile>();
  /** Entries checked part-way, by source index, then by entry offset. */
  #open = new Map<number, Map<number, EntryCheck>>();
  #hidden = new Uint8Array(HIDDEN_BUFFER_BYTES);

  constructor(fold: FoldResult, storage: Storage) {
    this.#paths = fold.sourcePaths;
    this.#checksums = fold.checksums;
    this.#storage = storage;
  }

  /** Fills `target` with the bytes of `piece` and returns their CRC32C. */
  read(piece: Extent, target: Uint8Array): number {
    const { sourceIndex, entryOffsetBytes: entryOffset } = piece;
    const file = this.#file(sourceIndex);
    let checks = this.#open.get(sourceIndex);
    if (checks === undefined) {
      checks = new Map();
      this.#open.set(sourceIndex, checks);
    }
    let check = checks.get(entryOffset);
    if (check === undefined) {
      check = this.#checksums[sourceIndex].startCheck(entryOffset);
      assert(
        check !== undefined,
        `no folded write entry at ${entryOffset} of source ${sourceIndex}`,
      );
    }
    const payloadOffset = entryOffset + ENTRY_HEADER_BYTES;
    const start = piece.sourceOffsetBytes - payloadOffset;
    const end = start + piece.lengthBytes;
    assert(
      start >= check.checkedBytes && end <= check.payloadBytes,
      `piece ${start}..${end} of the entry at ${entryOffset} out of order or range`,
    );
    this.#checkHidden(file, check, payloadOffset, start);
    readFully(file, target, piece.lengthBytes, piece.sourceOffsetBytes);
    const pieceCrc = crc32c(target);
    check.crc = check.checkedBytes === 0
      ? pieceCrc
      : crc32cCombine(check.crc, pieceCrc, piece.lengthBytes);
    check.checkedBytes = end;
    if (end === check.payloadBytes) {
      this.#finish(sourceIndex, entryOffset, check);
      checks.delete(entryOffset);
    } else {
      checks.set(entryOffset, check);
    }
    return pieceCrc;
  }

  /** Checks the entries whose last bytes no piece covered. */
  checkRest(): void {
    for (const [sourceIndex, checks] of this.#open) {
      const file = this.#file(sourceIndex);
      for (const [entryOffset, check] of checks) {
        const payloadOffset = entryOffset + ENTRY_HEADER_BYTES;
        this.#checkHidden(file, check, payloadOffset, check.payloadBytes);
        this.#finish(sourceIndex, entryOffset, check);
      }
    }
    this.#open.clear();
  }

  /** Extends the CRC of `check` over its payload up to `end`, bytes no piece shows. */
  #checkHidden(file: StorageFile, check: EntryCheck, payloadOffset: number, end: number): void {
    while (check.checkedBytes < end) {
      const length = Math.min(this.#hidden.length, end - check.checkedBytes);
      const bytes = this.#hidden.subarray(0, length);
      readFully(file, bytes, length, payloadOffset + check.checkedBytes);
      check.crc = crc32cCombine(check.crc, crc32c(bytes), length);
      check.checkedBytes += length;
    }
  }

  #finish(sourceIndex: number, entryOffset: number, check: EntryCheck): void {
    if (check.crc !== check.payloadCrc32c) {
      throw corruptEntry(this.#paths[sourceIndex], entryOffset, "bad payload checksum");
    }
  }

  #file(sourceIndex: number): StorageFile {
    const open = this.#files.get(sourceIndex);
    if (open !== undefined) return open;
    if (this.#files.size >= SOURCE_FDS_MAX) {
      const [oldest, file] = this.#files.entries().next().value!;
      file.close();
      this.#files.delete(oldest);
    }
    const file = openSource(this.#storage, this.#paths[sourceIndex]);
    this.#files.set(sourceIndex, file);
    return file;
  }

  close(): void {
    for (const file of this.#files.values()) file.close();
    this.#files.clear();
  }
}

/**
 * Copies the entries after the cut of the segment that straddles it into a new sealed segment
 * named by its first seq, byte for byte (their checksums travel with them).
 */
async function rewriteStraddle(
  logdir: string,
  plan: CompactPlan,
  step: (step: CompactStep) => void,
  created: string[],
): Promise<SegmentInfo | undefined> {
  const { fold, segments } = plan;
  const source = segments[fold.stopIndex];
  if (fold.foldedEntries === 0 || source === undefined || fold.stopOffsetBytes === 0) {
    step("segment-written");
    step("segment-renamed");
    return undefined;
  }
  const info = source.info!;
  const firstSeq = fold.cutSeq + 1;
  const file = segmentFileName(firstSeq);
  const path = join(logdir, SEGMENTS_DIR, file);
  const tempPath = path + TEMP_SUFFIX;
  created.push(tempPath);
  await copyRange(plan.storage, source.path, fold.stopOffsetBytes, info.sizeBytes, tempPath);
  step("segment-written");
  created.push(path);
  plan.storage.rename(tempPath, path);
  await syncDirectory(join(logdir, SEGMENTS_DIR), plan.storage);
  step("segment-renamed");
  return {
    file,
    firstSeq,
    lastSeq: info.lastSeq,
    firstUs: fold.nextEntryUs!,
    lastUs: info.lastUs,
    sizeBytes: info.sizeBytes - fold.stopOffsetBytes,
    entries: info.lastSeq - fold.cutSeq,
  };
}

async function copyRange(
  storage: Storage,
  from: string,
  startBytes: number,
  endBytes: number,
  to: string,
) {
  const input = openSource(storage, from);
  try {
    const output = storage.open(to, { create: true, truncate: true });
    try {
      const buffer = new Uint8Array(Math.min(COPY_BUFFER_BYTES, endBytes - startBytes));
      for (let position = startBytes; position < endBytes; position += buffer.length) {
        const length = Math.min(buffer.length, endBytes - position);
        readFully(input, buffer, length, position);
        output.write(buffer, length, position - startBytes);
      }
      await output.syncData();
    } finally {
      output.close();
    }
  } finally {
    input.close();
  }
}

/**
 * Replaces the manifest under the manifest lock: re-reads it (a running writer may have sealed
 * more segments: they are kept) and refuses when anything else changed under the compaction.
 */
function swapManifest(
  logdir: string,
  plan: CompactPlan,
  level: LevelInfo | undefined,
  straddle: SegmentInfo | undefined,
): Promise<ExecutionOutcome> {
  const { fold, manifest, storage } = plan;
  return withManifestLock(logdir, async () => {
    const fresh = await readManifest(logdir, storage);
    checkUnchanged(logdir, manifest, fresh);
    const nextUs = fold.nextEntryUs ??
      await firstEntryUsAfter(storage, logdir, fresh, fold.cutSeq);
    const horizonUs = newHorizonUs(manifest, fold, nextUs);
    if (level === undefined && horizonUs === manifest.horizonUs) {
      return { changed: false, horizonUs };
    }
    const next: Manifest = {
      ...fresh,
      horizonUs,
      levels: level === undefined ? fresh.levels : [{ ...level, cutUs: horizonUs }],
      segments: [
        ...(straddle === undefined ? [] : [straddle]),
        ...fresh.segments.filter((segment) => segment.firstSeq > fold.cutSeq),
      ],
      compactedMarks: [...fresh.compactedMarks, ...plan.foldedMarks],
    };
    removeManifestTemps(storage, logdir);
    await writeManifest(logdir, next, storage);
    return { changed: true, horizonUs, level: next.levels.at(-1) };
  }, storage);
}

/**
 * The new horizon: at the cut, but never before a folded entry (restores at the horizon must see
 * it) and never after an unfolded entry that is earlier than the cut (a live entry compaction
 * could not seal): a writer reopening the logdir checks that time does not go back from it.
 */
function newHorizonUs(manifest: Manifest, fold: FoldResult, nextUs: number | undefined): number {
  return Math.max(
    manifest.horizonUs,
    fold.lastFoldedUs ?? manifest.horizonUs,
    Math.min(fold.cutUs, nextUs ?? fold.cutUs),
  );
}

function checkUnchanged(logdir: string, planned: Manifest, fresh: Manifest): void {
  const sameLevels = planned.levels.length === fresh.levels.length &&
    planned.levels.every((level, i) => level.file === fresh.levels[i].file);
  const sameSegments = planned.segments.every((segment, i) =>
    fresh.segments[i]?.file === segment.file && fresh.segments[i].lastSeq === segment.lastSeq
  );
  if (
    fresh.logdirId !== planned.logdirId || fresh.base.file !== planned.base.file ||
    fresh.horizonUs !== planned.horizonUs || !sameLevels || !sameSegments
  ) {
    throw new BusyError(
      `Cannot compact ${logdir}: its base, levels or sealed segments changed while compaction ran (a new snapshot?); nothing was changed, run compact again`,
    );
  }
}

/** Time of the first entry with seq > `cutSeq` in `manifest`'s segments or the live one. */
async function firstEntryUsAfter(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
  cutSeq: number,
): Promise<number | undefined> {
  const sealed = manifest.segments.find((segment) => segment.lastSeq > cutSeq);
  if (sealed !== undefined) return sealed.firstUs;
  const live = (await listSegments(logdir, manifest, storage)).find((segment) => !segment.sealed);
  if (live === undefined) return undefined;
  const header = new Uint8Array(ENTRY_HEADER_BYTES);
  const file = openSource(storage, live.path);
  try {
    if (file.read(header, ENTRY_HEADER_BYTES, 0) < ENTRY_HEADER_BYTES) return undefined;
  } finally {
    file.close();
  }
  const decoded = decodeEntryHeader(header);
  return decoded.ok ? decoded.header.timeUs : undefined;
}

async function removeOldFiles(
  logdir: string,
  plan: CompactPlan,
  step: (step: CompactStep) => void,
): Promise<void> {
  const { fold, manifest, segments, storage } = plan;
  const old = [
    ...manifest.levels.map((level) => join(logdir, LEVELS_DIR, level.file)),
    ...segments.slice(0, fold.stopOffsetBytes > 0 ? fold.stopIndex + 1 : fold.stopIndex)
      .map((segment) => segment.path),
  ];
  if (fold.foldedEntries === 0) old.length = 0;
  if (old.length > 0) removeIfExists(old[0], storage);
  step("old-file-removed");
  for (const path of old.slice(1)) removeIfExists(path, storage);
  await syncDirectory(join(logdir, LEVELS_DIR), storage);
  await syncDirectory(join(logdir, SEGMENTS_DIR), storage);
  step("old-files-removed");
}

// ---------------------------------------------------------------------------------------------
// Leftovers of a compaction that died.

/**
 * Removes what a killed compaction left: temporary files, levels and segments the manifest does
 * not name (segments only before the live one), and stray manifest temp files. Runs under the
 * manifest lock so that no writer seals meanwhile.
 */
function removeLeftovers(logdir: string, storage: Storage): Promise<string[]> {
  return withManifestLock(logdir, async () => {
    const manifest = await readManifest(logdir, storage);
    const removed: string[] = [];
    const levels = new Set(manifest.levels.map((level) => level.file));
    const segments = new Set(manifest.segments.map((segment) => segment.file));
    const liveFrom = nextSeqAfterSealed(manifest);
    for (const name of fileNames(storage, join(logdir, LEVELS_DIR))) {
      if (name.endsWith(TEMP_SUFFIX) || (LEVEL_NAME_PATTERN.test(name) && !levels.has(name))) {
        removed.push(join(logdir, LEVELS_DIR, name));
      }
    }
    for (const name of fileNames(storage, join(logdir, SEGMENTS_DIR))) {
      const firstSeq = parseSegmentFileName(name);
      const stale = firstSeq !== undefined && firstSeq < liveFrom && !segments.has(name);
      if (name.endsWith(TEMP_SUFFIX) || stale) removed.push(join(logdir, SEGMENTS_DIR, name));
    }
    for (const path of removed) removeIfExists(path, storage);
    removed.push(...removeManifestTemps(storage, logdir));
    if (removed.length > 0) {
      await syncDirectory(join(logdir, LEVELS_DIR), storage);
      await syncDirectory(join(logdir, SEGMENTS_DIR), storage);
      await syncDirectory(logdir, storage);
    }
    return removed;
  }, storage);
}

/** Removes `manifest.json.tmp-*` files; only call under the manifest lock (no swap in flight). */
function removeManifestTemps(storage: Storage, logdir: string): string[] {
  const removed: string[] = [];
  for (const name of storage.readDir(logdir)) {
    if (name.startsWith(`${MANIFEST_FILE}.tmp-`)) {
      removeIfExists(join(logdir, name), storage);
      removed.push(join(logdir, name));
    }
  }
  return removed;
}

function fileNames(storage: Storage, dir: string): string[] {
  let names: string[];
  try {
    names = storage.readDir(dir);
  } catch (error) {
    if (error instanceof StorageNotFound) return [];
    throw error;
  }
  return names.filter((name) => storage.stat(join(dir, name))?.kind === "file");
}

// ---------------------------------------------------------------------------------------------
// The result.

function finish(
  plan: CompactPlan,
  run: { dryRun: boolean; startedMs: number; outcome?: ExecutionOutcome },
): CompactResult {
  const { fold, manifest } = plan;
  const outcome = run.outcome ?? dryRunOutcome(plan);
  const folded = outcome.changed && fold.foldedEntries > 0;
  const level = outcome.level ?? manifest.levels.at(-1);
  let entriesAfter = plan.entriesBefore;
  let bytesAfter = plan.bytesBefore;
  if (folded) {
    const old = levelTotals(manifest);
    entriesAfter += level!.entries - fold.consumedEntries - old.entries;
    bytesAfter += level!.sizeBytes - fold.consumedBytes - old.sizeBytes;
  }
  const logdirBytesAfter = plan.logdirBytesBefore - plan.bytesBefore + bytesAfter;
  const warnings = [...plan.warnings];
  if (plan.seal?.warning !== undefined) warnings.push(plan.seal.warning);
  return {
    logdir: plan.logdir,
    dryRun: run.dryRun,
    changed: outcome.changed,
    requestedCutUs: plan.requestedCutUs,
    cutUs: fold.cutUs,
    cutSeq: folded ? fold.cutSeq : applyFromSeq(manifest) - 1,
    previousHorizonUs: manifest.horizonUs,
    horizonUs: outcome.horizonUs,
    foldedEntries: folded ? fold.foldedEntries : 0,
    levelEntries: level?.entries ?? 0,
    levelBytes: level?.sizeBytes ?? 0,
    entriesBefore: plan.entriesBefore,
    entriesAfter,
    bytesBefore: plan.bytesBefore,
    bytesAfter,
    reclaimedBytes: plan.bytesBefore - bytesAfter,
    logdirBytesBefore: plan.logdirBytesBefore,
    logdirBytesAfter,
    compactedMarks: folded ? plan.foldedMarks : [],
    sealedVia: plan.seal?.via ?? "none",
    sealNote: plan.seal?.note,
    maxBytes: maxBytesReport(plan, logdirBytesAfter, warnings),
    keepMarks: plan.keepMarks,
    warnings,
    removedLeftovers: plan.removedLeftovers,
    durationMs: Math.round(performance.now() - run.startedMs),
  };
}

/** What a dry run would do: the same horizon rule, the level measured instead of written. */
function dryRunOutcome(plan: CompactPlan): ExecutionOutcome {
  const { fold, manifest } = plan;
  const horizonUs = newHorizonUs(manifest, fold, fold.nextEntryUs);
  if (fold.foldedEntries === 0) return { changed: horizonUs > manifest.horizonUs, horizonUs };
  const measured = measureLevel(fold.map);
  return {
    changed: true,
    horizonUs,
    level: {
      file: levelFileName(fold.cutSeq),
      cutUs: horizonUs,
      cutSeq: fold.cutSeq,
      sizeBytes: measured.sizeBytes,
      entries: measured.entries,
    },
  };
}

/** The `--max-bytes` report, and its warnings: a moved cut and a limit still exceeded. */
function maxBytesReport(
  plan: CompactPlan,
  logdirBytesAfter: number,
  warnings: string[],
): CompactMaxBytes | undefined {
  const limitBytes = plan.maxBytes;
  if (limitBytes === undefined) return undefined;
  const movedCut = plan.fold.cutUs > plan.plannedCutUs;
  const fits = logdirBytesAfter <= limitBytes;
  if (movedCut) {
    warnings.push(
      `--max-bytes ${limitBytes}: moved the cut forward from ${
        formatTimeUtc(plan.plannedCutUs)
      } to ${formatTimeUtc(plan.fold.cutUs)} to fit; history before it is no longer restorable`,
    );
  }
  if (!fits) {
    warnings.push(
      `--max-bytes ${limitBytes}: the logdir is still ${logdirBytesAfter} bytes after compaction (the base, the level and unsealed entries cannot shrink further)`,
    );
  }
  return { limitBytes, movedCut, fits };
}
