/**
 * `compact s3://bucket/prefix`: compaction of a logdir in object storage. The segments the fold
 * reads (those that start at or before the cut, and the next one, whose first entry bounds the
 * new horizon) and the levels are fetched into a temporary local logdir (not the base: the fold
 * never reads it); the local compaction
 * runs there; the new level and the rewritten tail segment go up as new objects; then the store's
 * manifest is replaced under the `manifest` lease, keeping every segment a `ship` added
 * meanwhile. The folded objects are retired, not deleted: a sweep deletes them after the grace
 * period, so a restore that read the old manifest completes. Holds the prefix's `compact` lease
 * throughout: one compaction per prefix.
 *
 * @module
 */
import { join } from "node:path";
import { compactLogdir, type CompactOptions, type CompactResult } from "../compact.ts";
import { UsageError } from "../errors.ts";
import { LEVELS_DIR, readManifest, SEGMENTS_DIR } from "../format/logdir.ts";
import type { Manifest } from "../format/manifest.ts";
import { StoreLease } from "./lease.ts";
import { StoreError } from "./object_store.ts";
import { withLocalCopyOf } from "./store_copy.ts";
import { RETIRE_GRACE_MS, retireObjects, type SweepResult, sweepRetired } from "./store_gc.ts";
import {
  commitManifest,
  levelObjectName,
  MANIFEST_OBJECT,
  manifestObjectNames,
  objectKey,
  readStoreManifest,
  segmentObjectName,
  type ShipToStoreOptions,
  type StoreLogdir,
  type Upload,
  uploadMissing,
} from "./store_logdir.ts";

/** Options of {@linkcode compactStore}. */
export interface StoreCompactOptions
  extends Omit<CompactOptions, "maxBytes" | "sealLive" | "onStep"> {
  /** Folded objects are deleted once retired this long ago (default {@linkcode RETIRE_GRACE_MS}). */
  graceMs?: number;
  /** Parent folder of the temporary copy (default: the system's temp dir). */
  cacheDir?: string;
  retryDelaysMs?: ShipToStoreOptions["retryDelaysMs"];
  onRetry?: ShipToStoreOptions["onRetry"];
}

/** What {@linkcode compactStore} did, besides what a local compaction reports. */
export interface StoreCompactResult extends CompactResult {
  store: {
    objectsDownloaded: number;
    bytesDownloaded: number;
    objectsUploaded: number;
    bytesUploaded: number;
    /** Objects the new manifest no longer names: deleted after the grace period. */
    objectsRetired: number;
    /** What the sweep at the end did (objects retired earlier and now past their grace). */
    sweep: SweepResult;
    graceMs: number;
  };
}

/**
 * Compacts the logdir at `source` up to `options.cutUs` (see the module doc).
 *
 * @example
 * ```ts
 * import { S3Store } from "./s3_store.ts";
 * import { compactStore } from "./store_compact.ts";
 * const store = new S3Store("backups", { endpoint: "http://127.0.0.1:8080" });
 * const sevenDaysUs = 7 * 24 * 3600 * 1_000_000;
 * await compactStore({ store, prefix: "vm1" }, { cutUs: Date.now() * 1000 - sevenDaysUs });
 * ```
 */
export async function compactStore(
  source: StoreLogdir,
  options: StoreCompactOptions,
): Promise<StoreCompactResult> {
  const startedMs = performance.now();
  const graceMs = options.graceMs ?? RETIRE_GRACE_MS;
  const where = source.store.describe(objectKey(source, "")).replace(/\/$/, "");
  await source.store.check();
  const remote = await readStoreManifest(source);
  if (remote === undefined) {
    throw new UsageError(`Cannot compact ${where}: it has no ${MANIFEST_OBJECT}`, {
      hint: `run \`sectorlog ship <logdir> ${where}\` first`,
    });
  }
  const lease = options.dryRun === true
    ? undefined
    : await StoreLease.acquire(source, "compact", { purpose: "compact" });
  try {
    // The fold reads the segments up to the cut and the next one (the new horizon's bound).
    const cutUs = Math.max(options.cutUs, remote.horizonUs);
    const after = remote.segments.find((segment) => segment.firstUs > cutUs);
    const needSeq = after?.firstSeq ?? remote.segments.at(-1)?.lastSeq ?? 0;
    const copied = remote.segments.filter((segment) => segment.firstSeq <= needSeq);
    // The fold never reads the base: it stays in the store. The copy is of `remote` exactly, so
    // that the commit can tell whether the store changed meanwhile.
    const need = { kind: "untilSeq" as const, seq: needSeq };
    return await withLocalCopyOf(source, remote, need, async (copy) => {
      const result = await compactLogdir(copy.logdir, { ...options, sealLive: false });
      const store: StoreCompactResult["store"] = {
        objectsDownloaded: copy.objectsDownloaded,
        bytesDownloaded: copy.bytesDownloaded,
        objectsUploaded: 0,
        bytesUploaded: 0,
        objectsRetired: 0,
        sweep: {
          records: 0,
          objectsDeleted: 0,
          objectsKept: 0,
          recordsWaiting: 0,
          orphansDeleted: 0,
        },
        graceMs,
      };
      let after = remote;
      if (result.changed && options.dryRun !== true) {
        const local = await readManifest(copy.logdir);
        const uploads = newObjects(copy.logdir, remote, local);
        const uploaded = await uploadMissing(source, uploads, new Map(), options);
        store.objectsUploaded = uploaded.objectsUploaded;
        store.bytesUploaded = uploaded.bytesUploaded;
        lease?.assertHeld();
        try {
          const commit = await commitManifest(
            source,
            options,
            (now) => compose(where, remote, copied.length, local, now),
          );
          after = commit.manifest;
          store.objectsRetired = commit.retired.length;
        } catch (error) {
          // The new objects are named by no manifest: let a sweep remove them.
          const keys = uploads.map((upload) => objectKey(source, upload.name));
          await retireObjects(source, keys, "compact (not committed)").catch(() => {});
          throw error;
        }
      }
      if (options.dryRun !== true) store.sweep = await sweepRetired(source, { graceMs });
      return {
        ...result,
        logdir: where,
        logdirBytesBefore: storedBytes(remote),
        logdirBytesAfter: options.dryRun === true
          ? storedBytes(remote) - result.reclaimedBytes
          : storedBytes(after),
        durationMs: Math.round(performance.now() - startedMs),
        store,
      };
    }, { cacheDir: options.cacheDir, skipBase: true });
  } finally {
    await lease?.release();
  }
}

/** The level and segment files the local compaction wrote that the store does not hold. */
function newObjects(logdir: string, remote: Manifest, local: Manifest): Upload[] {
  const held = manifestObjectNames(remote);
  const uploads: Upload[] = [];
  for (const level of local.levels) {
    const name = levelObjectName(level.file);
    if (held.has(name)) continue;
    uploads.push({ name, path: join(logdir, LEVELS_DIR, level.file), sizeBytes: level.sizeBytes });
  }
  for (const segment of local.segments) {
    const name = segmentObjectName(segment);
    if (held.has(name)) continue;
    uploads.push({
      name,
      path: join(logdir, SEGMENTS_DIR, segment.file),
      sizeBytes: segment.sizeBytes,
    });
  }
  return uploads;
}

/**
 * The store's new manifest: the compacted state of the first `copiedCount` segments, then the
 * segments a ship added after them meanwhile. Refuses when the store changed otherwise (a ship
 * that re-based the store): the compaction is then void and runs again next time.
 */
function compose(
  where: string,
  planned: Manifest,
  copiedCount: number,
  compacted: Manifest,
  now: Manifest | undefined,
): Manifest {
  const same = now !== undefined && now.logdirId === planned.logdirId &&
    now.base.file === planned.base.file &&
    JSON.stringify(now.levels) === JSON.stringify(planned.levels) &&
    JSON.stringify(now.segments.slice(0, copiedCount)) ===
      JSON.stringify(planned.segments.slice(0, copiedCount));
  if (!same) {
    throw new StoreError(
      `Cannot compact ${where}: its manifest was replaced while the compaction ran (a ship ` +
        "re-based it); nothing was removed, run compact again",
      { transient: true },
    );
  }
  return {
    ...now,
    base: compacted.base,
    horizonUs: compacted.horizonUs,
    levels: compacted.levels,
    compactedMarks: compacted.compactedMarks,
    segments: [...compacted.segments, ...now.segments.slice(copiedCount)],
  };
}

/** Base data + levels + segments a manifest names: what the logdir holds in the store. */
function storedBytes(manifest: Manifest): number {
  let bytes = manifest.base.dataBytes;
  for (const level of manifest.levels) bytes += level.sizeBytes;
  for (const segment of manifest.segments) bytes += segment.sizeBytes;
  return bytes;
}
