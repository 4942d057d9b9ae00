/**
 * The reading side of a logdir in object storage: {@linkcode withLocalCopy} downloads the
 * manifest and only the objects a request needs into a temporary local logdir, so that restore,
 * log and verify run unchanged on it.
 *
 * @module
 */
import { join } from "node:path";
import { IntegrityError, UsageError } from "../errors.ts";
import { ensureLogdirFolders, LEVELS_DIR, SEGMENTS_DIR, writeManifest } from "../format/logdir.ts";
import type { Manifest, SegmentInfo } from "../format/manifest.ts";
import { segmentFileName } from "../format/segment.ts";
import {
  baseObjectName,
  levelObjectName,
  MANIFEST_OBJECT,
  objectKey,
  readStoreManifest,
  segmentObjectName,
  type StoreLogdir,
} from "./store_logdir.ts";

/** Which entries a request of {@linkcode withLocalCopy} reads. */
export type CopyNeed =
  /** Everything (log, verify, a restore to a mark or to the latest state). */
  | { kind: "all" }
  /** Entries with time ≤ timeUs (a restore to an instant). */
  | { kind: "untilTime"; timeUs: number }
  /** Entries with seq ≤ seq (a restore to seq:N). */
  | { kind: "untilSeq"; seq: number };

/** What {@linkcode withLocalCopy} fetched. */
export interface LocalCopy {
  /** The temporary local logdir. */
  logdir: string;
  manifest: Manifest;
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
}

/**
 * Downloads the store's manifest and the objects `need` calls for — the base, every level and
 * only the segments that hold entries of the request — into a temporary local logdir, runs
 * `body` on it and removes it. The local manifest lists only the fetched segments, so the local
 * readers see a shorter but complete log.
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
  const remote = await readStoreManifest(source);
  const where = source.store.describe(objectKey(source, "")).replace(/\/$/, "");
  if (remote === undefined) {
    throw new UsageError(`Cannot open logdir ${where}: it has no ${MANIFEST_OBJECT}`, {
      hint: `run \`sectorlog ship <logdir> ${where}\` first`,
    });
  }
  const dir = await Deno.makeTempDir({ dir: options.cacheDir, prefix: "sectorlog-s3-" });
  try {
    const copy = await fetchObjects(source, remote, need, dir, where);
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
  } finally {
    await Deno.remove(dir, { recursive: true });
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
  where: string,
): Promise<LocalCopy> {
  await ensureLogdirFolders(dir);
  for (const file of [remote.base.file, ...remote.levels.map((level) => level.file)]) {
    // The manifest came over the network: its file names must not reach outside the copy.
    if (!/^[A-Za-z0-9_-][A-Za-z0-9_.-]*$/.test(file)) {
      throw new IntegrityError(
        `Invalid manifest ${source.store.describe(objectKey(source, MANIFEST_OBJECT))}: ` +
          `bad file name ${JSON.stringify(file)}`,
      );
    }
  }
  const names = new Map<string, string>();
  let objectsDownloaded = 0;
  let bytesDownloaded = 0;
  const fetchOne = async (name: string, path: string, sizeBytes: number) => {
    const key = objectKey(source, name);
    const what = source.store.describe(key);
    names.set(path, what);
    const got = await source.store.getToFile(key, path);
    if (got === undefined) {
      throw new IntegrityError(`Object ${what} named by the manifest is missing`, { path: what });
    }
    if (got !== sizeBytes) {
      throw new IntegrityError(
        `Object ${what} is ${got} bytes, the manifest says ${sizeBytes}`,
        { path: what, offsetBytes: Math.min(got, sizeBytes) },
      );
    }
    objectsDownloaded++;
    bytesDownloaded += got;
  };
  await fetchOne(
    baseObjectName(remote.base.file),
    join(dir, remote.base.file),
    remote.deviceBytes,
  );
  for (const level of remote.levels) {
    await fetchOne(levelObjectName(level.file), join(dir, LEVELS_DIR, level.file), level.sizeBytes);
  }
  // Sealed segments get their local name (first seq) in the copy, as in any logdir.
  const segments = remote.segments.filter((segment) => segmentNeeded(segment, need))
    .map((segment) => ({ ...segment, file: segmentFileName(segment.firstSeq) }));
  for (const segment of segments) {
    const path = join(dir, SEGMENTS_DIR, segment.file);
    await fetchOne(segmentObjectName(segment), path, segment.sizeBytes);
  }
  const manifest: Manifest = { ...remote, segments };
  await writeManifest(dir, manifest);
  return {
    logdir: dir,
    manifest,
    objectsDownloaded,
    bytesDownloaded,
    segmentsListed: remote.segments.length,
    segmentsFetched: segments.length,
    rename: (text) => {
      for (const [path, what] of names) text = text.replaceAll(path, what);
      return text.replaceAll(dir, where);
    },
  };
}
