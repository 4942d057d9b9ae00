/**
 * A logdir kept in object storage (see docs/FORMAT.md, "Logdirs in object storage"):
 *
 * ```text
 * <prefix>/base/<base file>                          the base snapshot (sparse image, whole)
 * <prefix>/levels/<level file>                       compacted levels
 * <prefix>/segments/<16 hex first>-<16 hex last>.seg sealed segments, immutable
 * <prefix>/manifest.json                             the logdir's manifest, written LAST
 * ```
 *
 * {@linkcode shipToStore} uploads a local logdir's sealed state (objects first, the manifest
 * last, so a reader never sees a manifest that names a missing object). The reading side is
 * `withLocalCopy` in store_copy.ts.
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { COMPACT_LOCK_FILE, sealLiveSegment } from "../compact.ts";
import { IntegrityError, UsageError } from "../errors.ts";
import { LEVELS_DIR, LogdirLock, readManifest, SEGMENTS_DIR } from "../format/logdir.ts";
import {
  encodeManifest,
  type Manifest,
  nextSeqAfterSealed,
  type SegmentInfo,
} from "../format/manifest.ts";
import { sleep } from "../sleep.ts";
import {
  baseObjectName,
  levelObjectName,
  MANIFEST_OBJECT,
  manifestObjectNames,
  objectKey,
  readStoreManifest,
  segmentObjectName,
  type StoreLogdir,
} from "./layout.ts";
import { StoreLease, withLease } from "./lease.ts";
import { StoreError } from "./object_store.ts";
import { retireObjects } from "./store_gc.ts";
export {
  baseObjectName,
  levelObjectName,
  MANIFEST_OBJECT,
  manifestObjectNames,
  objectKey,
  readStoreManifest,
  segmentObjectName,
  type StoreLogdir,
} from "./layout.ts";

/** Waits between attempts of one object upload that failed for a transient reason. */
export const UPLOAD_RETRY_DELAYS_MS: readonly number[] = [1_000, 2_000, 4_000, 8_000, 16_000];
/** Up to this many objects to upload, a ship round asks for each (HEAD) instead of listing. */
const HEADS_INSTEAD_OF_LIST_MAX = 16;
/** How long a writer waits for the prefix's `manifest` lease (held for a moment at a time). */
export const MANIFEST_LEASE_WAIT_MS = 60_000;

/** Options of {@linkcode shipToStore}. */
export interface ShipToStoreOptions {
  /** Called as bytes go up; totalBytes counts only the objects missing from the store. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Waits between attempts of an upload that failed transiently (default: 1, 2, 4, 8, 16 s). */
  retryDelaysMs?: readonly number[];
  /** Called before each retry, for a message. */
  onRetry?: (info: { what: string; error: StoreError; attempt: number; delayMs: number }) => void;
}

/** What {@linkcode shipToStore} did. */
export interface ShipToStoreResult {
  target: string;
  logdirId: string;
  hostId: string;
  /** How the store was brought up to date. */
  mode: ShipMode;
  /** Seq of the last entry the store's manifest now covers. */
  lastSeq: number;
  segments: number;
  levels: number;
  objectsUploaded: number;
  bytesUploaded: number;
  /** Objects already in the store, left as they were. */
  objectsPresent: number;
  /** False when the store's manifest already said the same. */
  manifestUploaded: boolean;
  /** Objects the store's manifest no longer names, to be deleted after the grace period. */
  objectsRetired: number;
  /** Who sealed the live segment: `ship` (this process), `watch` (on request) or `none`. */
  sealedVia: "ship" | "watch" | "none";
  /** Why the live segment could not be sealed (its entries were not shipped). */
  sealNote?: string;
  durationMs: number;
}

/** A local file to upload as object `name`. */
export interface Upload {
  name: string;
  path: string;
  sizeBytes: number;
}

/**
 * Uploads `logdir` to object storage: seals the live segment (through a running `watch`, or as a
 * momentary writer), then uploads what the store lacks, then the manifest. Objects already there
 * are never uploaded again, so an interrupted ship resumes. Holds the logdir's compaction lock
 * meanwhile, so no file it uploads is removed under it, and the prefix's `ship` lease, so two
 * ships to one prefix never run at once (the second gets a BusyError naming the first).
 *
 * The store's history is kept: when the local log continues the store's (the usual case), only
 * the new segments go up and the manifest gains them, so a `compact` of the store is not undone
 * by the next ship. When it does not (local compaction folded entries the store never got, or
 * the prefix is new), the store becomes a copy of the logdir; objects it no longer names are
 * retired: the next `compact` of the store deletes them after its grace period (store_gc.ts).
 *
 * @example
 * ```ts
 * import { S3Store } from "./s3_store.ts";
 * import { shipToStore } from "./store_logdir.ts";
 * const store = new S3Store("backups", { endpoint: "http://127.0.0.1:8080" });
 * const result = await shipToStore("/var/lib/sectorlog/vm1", { store, prefix: "vm1" });
 * console.log(`${result.objectsUploaded} objects uploaded`);
 * ```
 */
export async function shipToStore(
  logdir: string,
  target: StoreLogdir,
  options: ShipToStoreOptions = {},
): Promise<ShipToStoreResult> {
  await readManifest(logdir); // a clear error for a path that is not a logdir
  // The store is checked before anything local changes (sealing rotates the live segment).
  await target.store.check();
  const lease = await StoreLease.acquire(target, "ship", { purpose: `ship of ${logdir}` });
  try {
    return await shipRound(logdir, target, lease, options);
  } finally {
    await lease.release();
  }
}

async function shipRound(
  logdir: string,
  target: StoreLogdir,
  lease: StoreLease,
  options: ShipToStoreOptions,
): Promise<ShipToStoreResult> {
  const startedMs = performance.now();
  const lock = await LogdirLock.acquire(logdir, "ship to object storage", {
    file: COMPACT_LOCK_FILE,
    heldBy: "a compaction is running",
  });
  try {
    const seal = await sealLiveSegment(logdir, "ship");
    const manifest = await readManifest(logdir);
    const remote = await readStoreManifest(target);
    checkSameLogdir(logdir, target, manifest, remote);
    const plan = planShip(logdir, manifest, remote);
    const present = await presentObjects(target, plan.uploads);
    const result = await uploadMissing(target, plan.uploads, present, options);
    lease.assertHeld();
    const commit = await commitManifest(target, options, (now) => {
      checkSameLogdir(logdir, target, manifest, now);
      if (now === undefined || plan.mode === "mirror") return manifest;
      // "current": the store may be ahead of the logdir in its own way (a compaction of the
      // store): it stays as it is.
      return plan.mode === "append" ? appendTo(now, manifest) : now;
    });
    return {
      target: target.store.describe(objectKey(target, "")).replace(/\/$/, ""),
      logdirId: manifest.logdirId,
      hostId: manifest.hostId,
      mode: plan.mode,
      lastSeq: nextSeqAfterSealed(commit.manifest) - 1,
      segments: commit.manifest.segments.length,
      levels: commit.manifest.levels.length,
      ...result,
      manifestUploaded: commit.changed,
      objectsRetired: commit.retired.length,
      sealedVia: seal.via === "compact" ? "ship" : seal.via,
      sealNote: seal.via === "none" ? seal.warning ?? seal.note : undefined,
      durationMs: Math.round(performance.now() - startedMs),
    };
  } finally {
    lock.release();
  }
}

/**
 * Which of `uploads` the store already holds (key → size): a HEAD each for the few of a usual
 * round, one listing of the prefix for many (a first ship, a mirror), so that a `--follow` round
 * costs the same however long the store's log has grown.
 */
async function presentObjects(
  target: StoreLogdir,
  uploads: Upload[],
): Promise<Map<string, number>> {
  const present = new Map<string, number>();
  if (uploads.length <= HEADS_INSTEAD_OF_LIST_MAX) {
    const infos = await Promise.all(
      uploads.map((upload) => target.store.head(objectKey(target, upload.name))),
    );
    for (const info of infos) if (info !== undefined) present.set(info.key, info.sizeBytes);
    return present;
  }
  for await (const item of target.store.list(objectKey(target, ""))) {
    present.set(item.key, item.sizeBytes);
  }
  return present;
}

function checkSameLogdir(
  logdir: string,
  target: StoreLogdir,
  manifest: Manifest,
  remote: Manifest | undefined,
): void {
  if (remote !== undefined && remote.logdirId !== manifest.logdirId) {
    throw new UsageError(
      `Cannot ship ${logdir} to ${target.store.describe(objectKey(target, ""))}: it holds ` +
        `another logdir (id ${remote.logdirId}, host ${remote.hostId})`,
      { hint: "ship each logdir to its own prefix" },
    );
  }
}

/** How a ship round brings the store up to date (see {@linkcode shipToStore}). */
export type ShipMode =
  /** The store already holds every sealed entry of the logdir. */
  | "current"
  /** New segments are added after the store's. */
  | "append"
  /** The store becomes a copy of the logdir. */
  | "mirror";

function planShip(
  logdir: string,
  local: Manifest,
  remote: Manifest | undefined,
): { mode: ShipMode; uploads: Upload[] } {
  if (remote === undefined) return { mode: "mirror", uploads: plannedUploads(logdir, local) };
  const remoteNext = nextSeqAfterSealed(remote);
  if (nextSeqAfterSealed(local) <= remoteNext) return { mode: "current", uploads: [] };
  const index = local.segments.findIndex((segment) => segment.firstSeq === remoteNext);
  if (index < 0) return { mode: "mirror", uploads: plannedUploads(logdir, local) };
  const uploads = local.segments.slice(index).map((segment) => segmentUpload(logdir, segment));
  return { mode: "append", uploads };
}

/**
 * `remote` followed by the sealed segments of `local` after it. The store's base, levels and
 * horizon stay: they may be a compaction of the store's own.
 */
function appendTo(remote: Manifest, local: Manifest): Manifest {
  const remoteNext = nextSeqAfterSealed(remote);
  const added = local.segments.filter((segment) => segment.firstSeq >= remoteNext);
  if (added.length > 0 && added[0].firstSeq !== remoteNext) {
    // Only `ship` adds segments and it holds the ship lease: the store cannot have moved on.
    throw new StoreError(
      `The store's manifest ends at seq ${remoteNext - 1}, which no local segment continues`,
      { transient: true },
    );
  }
  return { ...remote, segments: [...remote.segments, ...added] };
}

/** What {@linkcode commitManifest} did. */
export interface ManifestCommit {
  manifest: Manifest;
  /** False when the store's manifest already said the same. */
  changed: boolean;
  /** Keys of the objects the old manifest named and the new one does not. */
  retired: string[];
}

/**
 * Replaces the store's manifest with `compose(the store's current manifest)` under the prefix's
 * `manifest` lease (waiting for it: others hold it only for a moment), then retires the objects
 * the old manifest named and the new one does not: they are deleted by a later sweep, after the
 * grace period, so that a reader still working from the old manifest keeps finding them.
 */
export async function commitManifest(
  target: StoreLogdir,
  options: { retryDelaysMs?: readonly number[]; onRetry?: ShipToStoreOptions["onRetry"] },
  compose: (current: Manifest | undefined) => Manifest,
): Promise<ManifestCommit> {
  // Nothing to change (a ship round with nothing new): no lease needed to say so.
  const before = await readStoreManifest(target);
  const unchanged = before !== undefined &&
    encodeManifest(compose(before)) === encodeManifest(before);
  if (unchanged) return { manifest: before, changed: false, retired: [] };
  return await withLease(
    target,
    "manifest",
    { purpose: "manifest update", waitMs: MANIFEST_LEASE_WAIT_MS, autoRenew: false },
    async (lease) => {
      const current = await readStoreManifest(target);
      const next = compose(current);
      const text = encodeManifest(next);
      if (current !== undefined && encodeManifest(current) === text) {
        return { manifest: next, changed: false, retired: [] };
      }
      lease.assertHeld();
      const key = objectKey(target, MANIFEST_OBJECT);
      await withRetry(
        target.store.describe(key),
        () => target.store.put(key, new TextEncoder().encode(text)),
        options,
      );
      const keep = manifestObjectNames(next);
      const retired = current === undefined
        ? []
        : [...manifestObjectNames(current)].filter((name) => !keep.has(name))
          .map((name) => objectKey(target, name));
      if (retired.length > 0) await retireObjects(target, retired, "manifest update");
      return { manifest: next, changed: true, retired };
    },
  );
}

/** Options of {@linkcode followToStore}. */
export interface FollowToStoreOptions extends ShipToStoreOptions {
  /** The RPO: a round starts at most this long after the previous one started. */
  maxLagMs: number;
  /** Ends the loop after the round in progress. */
  signal: AbortSignal;
  /** Called after every round; `lagMs` is how old the newest shipped state may be at most. */
  onRound?: (round: ShipToStoreResult & { round: number; lagMs: number }) => void;
  /** Called when a round failed transiently (the next round tries again). */
  onRoundError?: (error: StoreError) => void;
}

/** Longest `--max-lag`: a bound that is meant to be a recovery point objective. */
export const FOLLOW_MAX_LAG_MS_MAX = 24 * 60 * 60 * 1000;

/**
 * `ship --follow` to object storage: a {@linkcode shipToStore} round every `maxLagMs` (sealing
 * the live segment each time, so what reached the logdir before a round is in the store after
 * it) until `signal` aborts, holding the prefix's `ship` lease throughout. A transient store
 * failure skips to the next round; anything else ends the loop with its error. Returns the last
 * successful round.
 */
export async function followToStore(
  logdir: string,
  target: StoreLogdir,
  options: FollowToStoreOptions,
): Promise<ShipToStoreResult | undefined> {
  assert(
    options.maxLagMs > 0 && options.maxLagMs <= FOLLOW_MAX_LAG_MS_MAX,
    "maxLagMs out of range",
  );
  await readManifest(logdir);
  await target.store.check();
  const lease = await StoreLease.acquire(target, "ship", {
    purpose: `ship --follow of ${logdir}`,
  });
  try {
    let last: ShipToStoreResult | undefined;
    for (let round = 1; !options.signal.aborted; round++) {
      const startedMs = performance.now();
      try {
        last = await shipRound(logdir, target, lease, options);
        options.onRound?.({ ...last, round, lagMs: Math.round(performance.now() - startedMs) });
      } catch (error) {
        if (!(error instanceof StoreError) || !error.transient) throw error;
        options.onRoundError?.(error);
      }
      const waitMs = Math.max(0, options.maxLagMs - (performance.now() - startedMs));
      await sleep(waitMs, options.signal);
    }
    return last;
  } finally {
    await lease.release();
  }
}

function segmentUpload(logdir: string, segment: SegmentInfo): Upload {
  return {
    name: segmentObjectName(segment),
    path: join(logdir, SEGMENTS_DIR, segment.file),
    sizeBytes: segment.sizeBytes,
  };
}

function plannedUploads(logdir: string, manifest: Manifest): Upload[] {
  const uploads: Upload[] = [{
    name: baseObjectName(manifest.base.file),
    path: join(logdir, manifest.base.file),
    sizeBytes: manifest.deviceBytes,
  }];
  for (const level of manifest.levels) {
    uploads.push({
      name: levelObjectName(level.file),
      path: join(logdir, LEVELS_DIR, level.file),
      sizeBytes: level.sizeBytes,
    });
  }
  for (const segment of manifest.segments) uploads.push(segmentUpload(logdir, segment));
  return uploads;
}

/** Uploads the `uploads` whose keys `present` (key → size) lacks; sizes of present ones must match. */
export async function uploadMissing(
  target: StoreLogdir,
  uploads: Upload[],
  present: Map<string, number>,
  options: ShipToStoreOptions,
): Promise<{ objectsUploaded: number; bytesUploaded: number; objectsPresent: number }> {
  const missing: Upload[] = [];
  let objectsPresent = 0;
  for (const upload of uploads) {
    const key = objectKey(target, upload.name);
    const sizeBytes = present.get(key);
    if (sizeBytes === undefined) {
      missing.push(upload);
      continue;
    }
    // Objects are immutable and named by what they hold: another size means another content.
    if (sizeBytes !== upload.sizeBytes) {
      throw new IntegrityError(
        `Cannot ship ${upload.path}: ${target.store.describe(key)} already exists with ` +
          `${sizeBytes} bytes, the logdir's file has ${upload.sizeBytes}`,
        { path: upload.path },
      );
    }
    objectsPresent++;
  }
  const totalBytes = missing.reduce((sum, upload) => sum + upload.sizeBytes, 0);
  let doneBytes = 0;
  for (const upload of missing) {
    const key = objectKey(target, upload.name);
    await withRetry(target.store.describe(key), () =>
      target.store.putFile(key, upload.path, {
        sizeBytes: upload.sizeBytes,
        onProgress: (done) => options.onProgress?.(doneBytes + done, totalBytes),
      }), options);
    doneBytes += upload.sizeBytes;
    options.onProgress?.(doneBytes, totalBytes);
  }
  return { objectsUploaded: missing.length, bytesUploaded: totalBytes, objectsPresent };
}

async function withRetry<T>(
  what: string,
  attempt: () => Promise<T>,
  options: ShipToStoreOptions,
): Promise<T> {
  const delaysMs = options.retryDelaysMs ?? UPLOAD_RETRY_DELAYS_MS;
  for (let index = 0;; index++) {
    try {
      return await attempt();
    } catch (error) {
      if (!(error instanceof StoreError) || !error.transient || index >= delaysMs.length) {
        throw error;
      }
      options.onRetry?.({ what, error, attempt: index + 1, delayMs: delaysMs[index] });
      await sleep(delaysMs[index]);
    }
  }
}
