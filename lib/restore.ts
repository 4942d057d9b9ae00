/**
 * Restore: the device image as it was at a point in time, from the base snapshot, the compacted
 * levels and the entries up to the restore point. Streams everything: memory stays bounded by the
 * copy and scan buffers whatever the size of the journal or the device.
 *
 * @module
 */
import { join } from "node:path";
import { IntegrityError, UsageError } from "./errors.ts";
import type { EntryHeader } from "./format/entry.ts";
import { LEVELS_DIR, readLogEntries, withConsistentRead } from "./format/logdir.ts";
import type { Manifest } from "./format/manifest.ts";
import { SegmentScanner } from "./format/segment.ts";
import {
  copyImage,
  type CopyResult,
  type CopyTarget,
  fileSource,
  fileTarget,
} from "./sparse_copy.ts";
import { realStorage } from "./storage/real_storage.ts";
import { parentOf, type Storage, type StorageFile, unlinkIfExists } from "./storage/storage.ts";
import { resolveRestorePoint } from "./timeline.ts";
import type { TimeSpec } from "./time.ts";

/** Zeroes are written from one shared buffer of this size. */
const ZERO_CHUNK_BYTES = 1024 * 1024;
const zeroChunk = new Uint8Array(ZERO_CHUNK_BYTES);

/** Options of {@linkcode restoreAt}. */
export interface RestoreOptions {
  /** The point to restore to (default: the latest state). */
  at?: TimeSpec;
  /** Round down to the last flush at or before the point. */
  toFlush?: boolean;
  /** Overwrite an existing file or block device. */
  force?: boolean;
  /** The present, for refusing future times (default: the wall clock). */
  nowUs?: number;
  /**
   * Treat the first corrupt entry as the end of the log: the image is the state just before it
   * (reported in {@linkcode RestoreResult.stoppedAtCorruption}) instead of an error.
   */
  stopAtCorruption?: boolean;
  /** Called as bytes are copied and entries applied; total is an estimate. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /**
   * Writes the base image into the output instead of copying the logdir's base file (a restore
   * from object storage streams the base object straight into the output). Restore checks the
   * CRC32C it returns against the manifest's.
   */
  base?: BaseWriter;
  /** Where the logdir and the output live (default: the local filesystem). */
  storage?: Storage;
}

/**
 * Writes the whole base image (`manifest.deviceBytes`) to `target`, reporting bytes done as it
 * goes, and returns the bytes that held data and the CRC32C of the whole image.
 */
export type BaseWriter = (
  target: CopyTarget,
  onProgress: (doneBytes: number) => void,
) => Promise<CopyResult>;

/** What {@linkcode restoreAt} produced. */
export interface RestoreResult {
  output: string;
  /** The time the image represents. */
  targetUs: number;
  /** Seq of the last entry applied (the horizon state when none). */
  targetSeq: number;
  /** Time of the last entry applied. */
  lastEntryUs: number;
  deviceBytes: number;
  entriesApplied: number;
  levelEntriesApplied: number;
  /** Bytes of base data copied (holes excluded). */
  baseDataBytes: number;
  durationMs: number;
  /** Set when `stopAtCorruption` ended the restore early: what was corrupt, and where. */
  stoppedAtCorruption?: { message: string; path?: string; offsetBytes?: number };
}

/**
 * Writes the image of `logdir`'s device as of `options.at` to `output`: a new file, an existing
 * file or a block device (both need `force`). A new or replaced regular file is written to a
 * temporary name and renamed into place, so a failed restore leaves nothing half-written.
 *
 * @example
 * ```ts
 * import { restoreAt } from "./restore.ts";
 * import { parseTime } from "./time.ts";
 * await restoreAt("/var/lib/sectorlog/vm1", "/tmp/vm1-0213.img", { at: parseTime("-2h") });
 * ```
 */
export function restoreAt(
  logdir: string,
  output: string,
  options: RestoreOptions = {},
): Promise<RestoreResult> {
  const startedMs = performance.now();
  return withConsistentRead(logdir, () => restoreOnce(logdir, output, options, startedMs), {
    storage: options.storage,
  });
}

async function restoreOnce(
  logdir: string,
  output: string,
  options: RestoreOptions,
  startedMs: number,
): Promise<RestoreResult> {
  const storage = options.storage ?? realStorage;
  const point = await resolveRestorePoint(logdir, options.at, options);
  const manifest = point.timeline.manifest;
  const target = openOutput(storage, output, manifest.deviceBytes, options.force === true);
  try {
    const progress = progressTracker(manifest, point.timeline.entries, options.onProgress);
    const base = await writeBase(storage, logdir, manifest, target, progress, options.base);
    const levelEntriesApplied = await applyLevels(storage, logdir, manifest, target.file);
    let entriesApplied = 0;
    let appliedSeq = point.timeline.applyFromSeq - 1;
    let lastAppliedUs = manifest.horizonUs;
    let stoppedAtCorruption: RestoreResult["stoppedAtCorruption"];
    if (point.targetSeq >= point.timeline.applyFromSeq) {
      const entries = readLogEntries(logdir, manifest, {
        storage,
        fromSeq: point.timeline.applyFromSeq,
        onCorruption: options.stopAtCorruption === true
          ? (error) => stoppedAtCorruption = corruptionInfo(error)
          : undefined,
      });
      for await (const { header, payload } of entries) {
        if (header.seq > point.targetSeq) break;
        if (applyEntry(target.file, header, payload)) entriesApplied++;
        appliedSeq = header.seq;
        lastAppliedUs = header.timeUs;
        progress.entry(header);
      }
    }
    if (stoppedAtCorruption === undefined && point.stoppedAtCorruption !== undefined) {
      stoppedAtCorruption = point.stoppedAtCorruption;
    }
    if (appliedSeq < point.timeline.floorSeq) {
      throw new IntegrityError(
        `Cannot restore ${logdir}: the log is corrupt before the earliest restorable state (${stoppedAtCorruption?.message})`,
        { path: stoppedAtCorruption?.path, offsetBytes: stoppedAtCorruption?.offsetBytes },
      );
    }
    await target.file.syncData();
    await target.commit();
    const complete = appliedSeq >= point.targetSeq;
    return {
      output,
      targetUs: complete ? point.targetUs : lastAppliedUs,
      targetSeq: complete ? point.targetSeq : appliedSeq,
      lastEntryUs: complete ? point.lastEntryUs : lastAppliedUs,
      deviceBytes: manifest.deviceBytes,
      entriesApplied,
      levelEntriesApplied,
      baseDataBytes: base.dataBytes,
      durationMs: Math.round(performance.now() - startedMs),
      stoppedAtCorruption,
    };
  } catch (error) {
    target.abort();
    throw error;
  }
}

function corruptionInfo(error: IntegrityError): NonNullable<RestoreResult["stoppedAtCorruption"]> {
  return { message: error.message, path: error.path, offsetBytes: error.offsetBytes };
}

/** Applies one entry to an image; returns false for entries that change no bytes. */
export function applyEntry(file: StorageFile, header: EntryHeader, payload: Uint8Array): boolean {
  switch (header.kind) {
    case "write":
      file.write(payload, payload.length, header.offsetBytes);
      return true;
    case "zero":
    case "trim":
      writeZeroes(file, header.offsetBytes, header.lengthBytes);
      return true;
    default:
      return false;
  }
}

function writeZeroes(file: StorageFile, offsetBytes: number, lengthBytes: number): void {
  for (let done = 0; done < lengthBytes; done += ZERO_CHUNK_BYTES) {
    file.write(zeroChunk, Math.min(ZERO_CHUNK_BYTES, lengthBytes - done), offsetBytes + done);
  }
}

/** Writes the base into the output (from the logdir's file or `writer`) and checks its CRC32C. */
async function writeBase(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
  target: RestoreTarget,
  progress: ProgressTracker,
  writer: BaseWriter | undefined,
): Promise<CopyResult> {
  const path = join(logdir, manifest.base.file);
  const onProgress = (doneBytes: number) => progress.base(doneBytes);
  const copy = writer === undefined
    ? await copyBaseFile(storage, path, manifest, target, onProgress)
    : await writer(target.copyTarget, onProgress);
  if (copy.crc32c !== manifest.base.crc32c) {
    throw new IntegrityError(
      `Base snapshot ${path} does not match its checksum (crc32c ${copy.crc32c}, expected ${manifest.base.crc32c})`,
      { path },
    );
  }
  return copy;
}

async function copyBaseFile(
  storage: Storage,
  path: string,
  manifest: Manifest,
  target: RestoreTarget,
  onProgress: (doneBytes: number) => void,
): Promise<CopyResult> {
  let file: StorageFile;
  try {
    file = storage.open(path);
  } catch (error) {
    throw new IntegrityError(`Cannot open base snapshot ${path}: ${(error as Error).message}`, {
      path,
      cause: error,
    });
  }
  try {
    const size = file.sizeBytes();
    if (size !== manifest.deviceBytes) {
      throw new IntegrityError(
        `Base snapshot ${path} is ${size} bytes, the manifest says ${manifest.deviceBytes}`,
        { path, offsetBytes: Math.min(size, manifest.deviceBytes) },
      );
    }
    return await copyImage(fileSource(file, size), target.copyTarget, {
      extents: storage.dataExtents(path, size),
      onProgress,
    });
  } finally {
    file.close();
  }
}

async function applyLevels(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
  file: StorageFile,
): Promise<number> {
  let applied = 0;
  for (const level of manifest.levels) {
    const scanner = new SegmentScanner(join(logdir, LEVELS_DIR, level.file), {
      storage,
      tolerateTornTail: false,
      endBytes: level.sizeBytes,
    });
    for await (const { header, payload } of scanner.entries()) {
      if (applyEntry(file, header, payload)) applied++;
    }
  }
  return applied;
}

interface ProgressTracker {
  base(doneBytes: number): void;
  entry(header: EntryHeader): void;
}

function progressTracker(
  manifest: Manifest,
  entries: number,
  onProgress: RestoreOptions["onProgress"],
): ProgressTracker {
  // Progress counts base bytes, then one unit per entry scaled to 4 KiB so both phases show.
  const entryUnitBytes = 4096;
  const totalBytes = manifest.deviceBytes + entries * entryUnitBytes;
  let entriesDone = 0;
  return {
    base: (doneBytes) => onProgress?.(doneBytes, totalBytes),
    entry: () => {
      entriesDone++;
      if (entriesDone % 64 === 0 || entriesDone === entries) {
        onProgress?.(manifest.deviceBytes + entriesDone * entryUnitBytes, totalBytes);
      }
    },
  };
}

interface RestoreTarget {
  file: StorageFile;
  copyTarget: CopyTarget;
  commit(): Promise<void>;
  abort(): void;
}

/** Opens the restore output: a temp file renamed into place, or a block device written directly. */
function openOutput(
  storage: Storage,
  output: string,
  deviceBytes: number,
  force: boolean,
): RestoreTarget {
  const stat = storage.stat(output);
  if (stat !== undefined && !force) {
    throw new UsageError(`Cannot restore to ${output}: it already exists`, {
      hint: "pass --force to overwrite it",
    });
  }
  if (stat?.kind === "block-device") return openBlockDeviceOutput(storage, output, deviceBytes);
  if (stat !== undefined && stat.kind !== "file") {
    throw new UsageError(`Cannot restore to ${output}: it is neither a file nor a block device`);
  }
  const tempPath = `${output}.partial-${Deno.pid}`;
  let file: StorageFile;
  try {
    file = storage.open(tempPath, { create: true, truncate: true });
  } catch (error) {
    throw new UsageError(`Cannot create ${tempPath}: ${(error as Error).message}`, {
      cause: error,
    });
  }
  file.truncate(deviceBytes);
  let open = true;
  return {
    file,
    copyTarget: fileTarget(file, true),
    commit: async () => {
      file.close();
      open = false;
      storage.rename(tempPath, output);
      await storage.syncDirectory(parentOf(output));
    },
    abort: () => {
      if (open) file.close();
      open = false;
      try {
        unlinkIfExists(storage, tempPath);
      } catch { /* already gone */ }
    },
  };
}

function openBlockDeviceOutput(
  storage: Storage,
  output: string,
  deviceBytes: number,
): RestoreTarget {
  const file = storage.open(output, { write: true });
  const sizeBytes = file.sizeBytes();
  if (sizeBytes < deviceBytes) {
    file.close();
    throw new UsageError(
      `Cannot restore to ${output}: the block device is ${sizeBytes} bytes, the image needs ${deviceBytes}`,
    );
  }
  let open = true;
  return {
    file,
    copyTarget: fileTarget(file, false),
    commit: () => {
      file.close();
      open = false;
      return Promise.resolve();
    },
    abort: () => {
      if (open) file.close();
      open = false;
    },
  };
}
