/**
 * The reading side of a logdir in object storage: {@linkcode withLocalCopy} downloads the
 * manifest and only the objects a request needs (as parallel ranged GETs) into a temporary local
 * logdir, so that restore, log and verify run unchanged on it; {@linkcode withConsistentStoreRead}
 * starts a read over when a compaction swapped the manifest under it.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { IntegrityError, UsageError } from "../errors.ts";
import {
  CONSISTENT_READ_ATTEMPTS_MAX,
  ensureLogdirFolders,
  LEVELS_DIR,
  SEGMENTS_DIR,
  writeManifest,
} from "../format/logdir.ts";
import { encodeManifest, type Manifest, type SegmentInfo } from "../format/manifest.ts";
import { segmentFileName } from "../format/segment.ts";
import { fdTarget, writeNonZeroRuns } from "../sparse_copy.ts";
import type { TimeSpec } from "../time.ts";
import { GET_PART_BYTES, getRanged, GETS_IN_FLIGHT_MAX, type RangedObject } from "./_ranged_get.ts";
import {
  baseObjectName,
  levelObjectName,
  MANIFEST_OBJECT,
  objectKey,
  readStoreManifest,
  segmentObjectName,
  type StoreLogdir,
} from "./store_logdir.ts";

export { GET_PART_BYTES, GETS_IN_FLIGHT_MAX };

/** Which entries a request of {@linkcode withLocalCopy} reads. */
export type CopyNeed =
  /** Everything (log, verify, a restore to a mark or to the latest state). */
  | { kind: "all" }
  /** Entries with time ≤ timeUs (a restore to an instant). */
  | { kind: "untilTime"; timeUs: number }
  /** Entries with seq ≤ seq (a restore to seq:N). */
  | { kind: "untilSeq"; seq: number };

/**
 * Which entries a restore to `at` needs: only the segments up to that point when it is an
 * instant or a seq (a mark or the latest state can be anywhere in the log).
 *
 * @example
 * ```ts
 * import { copyNeedFor } from "./store_copy.ts";
 * copyNeedFor({ kind: "seq", seq: 42 }); // { kind: "untilSeq", seq: 42 }
 * ```
 */
export function copyNeedFor(at: TimeSpec | undefined): CopyNeed {
  if (at?.kind === "instant") return { kind: "untilTime", timeUs: at.timeUs };
  if (at?.kind === "seq") return { kind: "untilSeq", seq: at.seq };
  return { kind: "all" };
}

/** What {@linkcode withLocalCopy} fetched. */
export interface LocalCopy {
  /** The temporary local logdir. */
  logdir: string;
  /** The copy's manifest: the store's, listing only the fetched segments. */
  manifest: Manifest;
  /** The store's manifest the copy was made from. */
  storeManifest: Manifest;
  objectsDownloaded: number;
  bytesDownloaded: number;
  /** Sealed segments the store's manifest lists, and how many of them were fetched. */
  segmentsListed: number;
  segmentsFetched: number;
  /** Rewrites `text` (a message) to name the store's objects instead of the copy's files. */
  rename(text: string): string;
}

/** Options of {@linkcode withLocalCopy}. */
export interface LocalCopyOptions {
  /** Parent folder of the temporary copy (default: the system's temp dir). */
  cacheDir?: string;
  /**
   * Do not download the base: the caller streams it itself (a restore writes it straight into
   * its output). The copy's manifest still names it, so only readers that never open the base
   * file (the timeline, entries and levels; a restore given a `base` writer) may run on it.
   */
  skipBase?: boolean;
  /** Bytes per ranged GET (default {@linkcode GET_PART_BYTES}). */
  partBytes?: number;
  /** Ranged GETs in flight at once (default {@linkcode GETS_IN_FLIGHT_MAX}). */
  getsInFlightMax?: number;
  /** Called as objects come down; the total is the bytes of every object fetched. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

/**
 * Downloads the store's manifest and the objects `need` calls for — the base, every level and
 * only the segments that hold entries of the request — into a temporary local logdir, runs
 * `body` on it and removes it. The local manifest lists only the fetched segments, so the local
 * readers see a shorter but complete log. Objects come down as parallel ranged GETs; when one is
 * missing because a compaction replaced the manifest meanwhile, the download starts over from the
 * new manifest (see {@linkcode withConsistentStoreRead}). `body` runs once.
 *
 * @example
 * ```ts
 * import { restoreAt } from "../restore.ts";
 * import { S3Store } from "./s3_store.ts";
 * import { withLocalCopy } from "./store_copy.ts";
 * const store = new S3Store("backups", { endpoint: "http://127.0.0.1:8080" });
 * const timeUs = Date.now() * 1000 - 3_600_000_000;
 * await withLocalCopy({ store, prefix: "vm1" }, { kind: "untilTime", timeUs }, (copy) =>
 *   restoreAt(copy.logdir, "/tmp/vm1.img", { at: { kind: "instant", timeUs } }));
 * ```
 */
export async function withLocalCopy<T>(
  source: StoreLogdir,
  need: CopyNeed,
  body: (copy: LocalCopy) => Promise<T>,
  options: LocalCopyOptions = {},
): Promise<T> {
  await source.store.check();
  const dir = await Deno.makeTempDir({ dir: options.cacheDir, prefix: "sectorlog-s3-" });
  try {
    const copy = await withConsistentStoreRead(source, async (remote, attempt) => {
      // A fresh folder per attempt: files of an earlier attempt could pass for live segments.
      const attemptDir = join(dir, `attempt-${attempt}`);
      try {
        return await fetchObjects(source, remote, need, attemptDir, options);
      } catch (error) {
        await Deno.remove(attemptDir, { recursive: true }).catch(() => {});
        throw error;
      }
    });
    return await renamingErrors(copy, body);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * {@linkcode withLocalCopy} of the state `remote` (a manifest the caller read from the store),
 * without retrying: for a caller that retries the whole read itself (a restore, whose body
 * reads objects too).
 *
 * @example
 * ```ts
 * import { S3Store } from "./s3_store.ts";
 * import { withConsistentStoreRead, withLocalCopyOf } from "./store_copy.ts";
 * const source = { store: new S3Store("backups"), prefix: "vm1" };
 * const segments = await withConsistentStoreRead(source, (remote) =>
 *   withLocalCopyOf(source, remote, { kind: "all" }, (copy) =>
 *     Promise.resolve(copy.segmentsFetched)));
 * ```
 */
export async function withLocalCopyOf<T>(
  source: StoreLogdir,
  remote: Manifest,
  need: CopyNeed,
  body: (copy: LocalCopy) => Promise<T>,
  options: LocalCopyOptions = {},
): Promise<T> {
  const dir = await Deno.makeTempDir({ dir: options.cacheDir, prefix: "sectorlog-s3-" });
  try {
    const copy = await fetchObjects(source, remote, need, dir, options);
    return await renamingErrors(copy, body);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * Reads the store's manifest and runs `read` on it. When `read` fails with an
 * {@linkcode IntegrityError} (typically an object missing because a compaction removed it) and
 * the store's manifest has changed since it was read, runs `read` again on the new manifest, up to
 * {@linkcode CONSISTENT_READ_ATTEMPTS_MAX} times in all: the store's counterpart of
 * `withConsistentRead` for local logdirs. With the manifest unchanged the error is reported as is.
 *
 * @example
 * ```ts
 * import { S3Store } from "./s3_store.ts";
 * import { withConsistentStoreRead } from "./store_copy.ts";
 * const source = { store: new S3Store("backups"), prefix: "vm1" };
 * const levels = await withConsistentStoreRead(source, (manifest) =>
 *   Promise.resolve(manifest.levels.length));
 * ```
 */
export async function withConsistentStoreRead<T>(
  source: StoreLogdir,
  read: (remote: Manifest, attempt: number) => Promise<T>,
): Promise<T> {
  let remote = await openStoreManifest(source);
  for (let attempt = 1;; attempt++) {
    try {
      return await read(remote, attempt);
    } catch (error) {
      if (!(error instanceof IntegrityError) || attempt >= CONSISTENT_READ_ATTEMPTS_MAX) {
        throw error;
      }
      const now = await readStoreManifest(source);
      if (now === undefined || encodeManifest(now) === encodeManifest(remote)) throw error;
      remote = now;
    }
  }
}

/** The store's manifest, or a {@linkcode UsageError} saying how to put a logdir there. */
async function openStoreManifest(source: StoreLogdir): Promise<Manifest> {
  const remote = await readStoreManifest(source);
  if (remote === undefined) {
    const where = logdirName(source);
    throw new UsageError(`Cannot open logdir ${where}: it has no ${MANIFEST_OBJECT}`, {
      hint: `run \`sectorlog ship <logdir> ${where}\` first`,
    });
  }
  return remote;
}

/** `s3://bucket/prefix`: the logdir's name in messages. */
function logdirName(source: StoreLogdir): string {
  return source.store.describe(objectKey(source, "")).replace(/\/$/, "");
}

async function renamingErrors<T>(copy: LocalCopy, body: (copy: LocalCopy) => Promise<T>) {
  try {
    return await body(copy);
  } catch (error) {
    // Errors of the local readers name files of the throw-away copy: name the objects instead.
    if (error instanceof Error) error.message = copy.rename(error.message);
    if (error instanceof IntegrityError && error.path !== undefined) {
      error.path = copy.rename(error.path);
    }
    throw error;
  }
}

function segmentNeeded(segment: SegmentInfo, need: CopyNeed): boolean {
  if (need.kind === "untilTime") return segment.firstUs <= need.timeUs;
  if (need.kind === "untilSeq") return segment.firstSeq <= need.seq;
  return true;
}

async function fetchObjects(
  source: StoreLogdir,
  remote: Manifest,
  need: CopyNeed,
  dir: string,
  options: LocalCopyOptions,
): Promise<LocalCopy> {
  await ensureLogdirFolders(dir);
  const manifestName = source.store.describe(objectKey(source, MANIFEST_OBJECT));
  for (const file of [remote.base.file, ...remote.levels.map((level) => level.file)]) {
    // The manifest came over the network: its file names must not reach outside the copy.
    if (!/^[A-Za-z0-9_-][A-Za-z0-9_.-]*$/.test(file)) {
      throw new IntegrityError(
        `Invalid manifest ${manifestName}: bad file name ${JSON.stringify(file)}`,
      );
    }
  }
  const names = new Map<string, string>();
  const downloads: RangedObject[] = [];
  const add = (name: string, path: string, sizeBytes: number, fetch = true) => {
    const key = objectKey(source, name);
    names.set(path, source.store.describe(key));
    if (fetch) downloads.push(fileSink(key, path, sizeBytes));
  };
  // The base keeps its name even when it is not fetched, so messages about it name the object.
  add(
    baseObjectName(remote.base.file),
    join(dir, remote.base.file),
    remote.deviceBytes,
    options.skipBase !== true,
  );
  for (const level of remote.levels) {
    add(levelObjectName(level.file), join(dir, LEVELS_DIR, level.file), level.sizeBytes);
  }
  // Sealed segments get their local name (first seq) in the copy, as in any logdir.
  const segments = remote.segments.filter((segment) => segmentNeeded(segment, need))
    .map((segment) => ({ ...segment, file: segmentFileName(segment.firstSeq) }));
  for (const segment of segments) {
    add(segmentObjectName(segment), join(dir, SEGMENTS_DIR, segment.file), segment.sizeBytes);
  }
  const totalBytes = downloads.reduce((sum, object) => sum + object.sizeBytes, 0);
  let doneBytes = 0;
  await getRanged(source.store, downloads, {
    partBytes: options.partBytes,
    inFlightMax: options.getsInFlightMax,
    namedBy: manifestName,
    onPart: (lengthBytes) => {
      doneBytes += lengthBytes;
      options.onProgress?.(doneBytes, totalBytes);
    },
  });
  const manifest: Manifest = { ...remote, segments };
  await writeManifest(dir, manifest);
  const where = logdirName(source);
  return {
    logdir: dir,
    manifest,
    storeManifest: remote,
    objectsDownloaded: downloads.length,
    bytesDownloaded: totalBytes,
    segmentsListed: remote.segments.length,
    segmentsFetched: segments.length,
    rename: (text) => {
      for (const [path, what] of names) text = text.replaceAll(path, what);
      return text.replaceAll(dir, where);
    },
  };
}

/**
 * A download into the file at `path`, created now with the object's size: parts are written where
 * they belong as they arrive, and runs of zero bytes stay holes (the base is a sparse image).
 */
function fileSink(key: string, path: string, sizeBytes: number): RangedObject {
  const fd = fs.openSync(path, "w");
  try {
    fs.ftruncateSync(fd, sizeBytes);
  } finally {
    fs.closeSync(fd);
  }
  return {
    key,
    sizeBytes,
    onPart: (offsetBytes, bytes) => {
      // Opened per part: a copy may hold thousands of segments, more than the open-file limit.
      const partFd = fs.openSync(path, "r+");
      try {
        writeNonZeroRuns(bytes, offsetBytes, fdTarget(partFd, true));
      } finally {
        fs.closeSync(partFd);
      }
    },
  };
}
