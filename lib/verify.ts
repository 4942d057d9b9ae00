/**
 * verify: reads everything a logdir holds and checks it — the base snapshot against its
 * checksum, every entry's checksums, seq continuity and time order, sealed segment totals.
 *
 * @module
 */
import { join } from "node:path";
import { IntegrityError } from "./errors.ts";
import { LEVELS_DIR, readLogEntries, readManifest, withConsistentRead } from "./format/logdir.ts";
import type { Manifest } from "./format/manifest.ts";
import { SegmentScanner } from "./format/segment.ts";
import { copyImage, fileSource } from "./sparse_copy.ts";
import { realStorage } from "./storage/real_storage.ts";
import type { Storage, StorageFile } from "./storage/storage.ts";
import { applyFromSeq } from "./timeline.ts";

/** One problem found by {@linkcode verifyLogdir}. */
export interface VerifyProblem {
  /** The file that holds it. */
  path: string;
  /** Byte offset within the file, when known. */
  offsetBytes?: number;
  message: string;
}

/** What {@linkcode verifyLogdir} found. */
export interface VerifyResult {
  ok: boolean;
  problems: VerifyProblem[];
  /** A torn tail at the end of the live segment: normal after a crash or while a writer appends. */
  tornTail?: { path: string; offsetBytes: number; bytes: number; problem: string };
  baseCrc32c: string;
  segments: number;
  levels: number;
  entries: number;
  firstSeq: number;
  lastSeq: number;
  bytesChecked: number;
}

/** Options of {@linkcode verifyLogdir}. */
export interface VerifyOptions {
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Where the logdir lives (default: the local filesystem). */
  storage?: Storage;
}

/**
 * Checks a logdir and returns every problem found (it does not throw on corruption; a missing
 * logdir or unreadable manifest still throws).
 *
 * @example
 * ```ts
 * import { verifyLogdir } from "./verify.ts";
 * const result = await verifyLogdir("/var/lib/sectorlog/vm1");
 * if (!result.ok) console.error(result.problems);
 * ```
 */
export function verifyLogdir(
  logdir: string,
  options: VerifyOptions = {},
): Promise<VerifyResult> {
  return withConsistentRead(logdir, () => verifyOnce(logdir, options), {
    isProblem: (result) => !result.ok,
    storage: options.storage,
  });
}

async function verifyOnce(logdir: string, options: VerifyOptions): Promise<VerifyResult> {
  const storage = options.storage ?? realStorage;
  const manifest = await readManifest(logdir, storage);
  const problems: VerifyProblem[] = [];
  const baseCrc32c = await verifyBase(storage, logdir, manifest, problems, options);
  let bytesChecked = manifest.deviceBytes;
  const levelEntries = await verifyLevels(storage, logdir, manifest, problems);
  const result: VerifyResult = {
    ok: false,
    problems,
    baseCrc32c,
    segments: 0,
    levels: manifest.levels.length,
    entries: levelEntries,
    firstSeq: applyFromSeq(manifest),
    lastSeq: applyFromSeq(manifest) - 1,
    bytesChecked,
  };
  const segmentPaths = new Set<string>();
  try {
    const entries = readLogEntries(logdir, manifest, {
      storage,
      onTornTail: (tail) => result.tornTail = tail,
    });
    for await (const entry of entries) {
      segmentPaths.add(entry.segmentPath);
      result.entries++;
      result.lastSeq = entry.header.seq;
      bytesChecked += 64 + entry.header.payloadBytes;
    }
  } catch (error) {
    if (!(error instanceof IntegrityError)) throw error;
    problems.push({
      path: error.path ?? logdir,
      offsetBytes: error.offsetBytes,
      message: error.message,
    });
  }
  result.segments = segmentPaths.size;
  result.bytesChecked = bytesChecked;
  result.ok = problems.length === 0;
  return result;
}

async function verifyBase(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
  problems: VerifyProblem[],
  options: VerifyOptions,
): Promise<string> {
  const path = join(logdir, manifest.base.file);
  let file: StorageFile;
  try {
    file = storage.open(path);
  } catch (error) {
    problems.push({
      path,
      message: `Cannot open base snapshot ${path}: ${(error as Error).message}`,
    });
    return "";
  }
  try {
    const size = file.sizeBytes();
    if (size !== manifest.deviceBytes) {
      problems.push({
        path,
        offsetBytes: Math.min(size, manifest.deviceBytes),
        message:
          `Base snapshot ${path} is ${size} bytes, the manifest says ${manifest.deviceBytes}`,
      });
      return "";
    }
    const sink = { holesAreZero: true, write: () => {} };
    const copy = await copyImage(fileSource(file, size), sink, {
      extents: storage.dataExtents(path, size),
      onProgress: options.onProgress,
    });
    if (copy.crc32c !== manifest.base.crc32c) {
      problems.push({
        path,
        message:
          `Base snapshot ${path} does not match its checksum (crc32c ${copy.crc32c}, expected ${manifest.base.crc32c})`,
      });
    }
    return copy.crc32c;
  } finally {
    file.close();
  }
}

async function verifyLevels(
  storage: Storage,
  logdir: string,
  manifest: Manifest,
  problems: VerifyProblem[],
): Promise<number> {
  let entries = 0;
  for (const level of manifest.levels) {
    const path = join(logdir, LEVELS_DIR, level.file);
    try {
      const scanner = new SegmentScanner(path, {
        storage,
        tolerateTornTail: false,
        endBytes: level.sizeBytes,
      });
      for await (const _ of scanner.entries()) entries++;
    } catch (error) {
      const integrity = error instanceof IntegrityError ? error : undefined;
      problems.push({
        path,
        offsetBytes: integrity?.offsetBytes,
        message: integrity?.message ?? `Cannot read level ${path}: ${(error as Error).message}`,
      });
    }
  }
  return entries;
}
