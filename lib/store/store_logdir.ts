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
 * last, so a reader never sees a manifest that names a missing object). {@linkcode withLocalCopy}
 * is the reading side: it downloads the manifest and only the objects a request needs into a
 * temporary local logdir, so that restore, log and verify run unchanged on it.
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { COMPACT_LOCK_FILE, sealLiveSegment } from "../compact.ts";
import { IntegrityError, UsageError } from "../errors.ts";
import {
  ensureLogdirFolders,
  LEVELS_DIR,
  LogdirLock,
  readManifest,
  SEGMENTS_DIR,
  writeManifest,
} from "../format/logdir.ts";
import {
  decodeManifest,
  encodeManifest,
  type Manifest,
  MANIFEST_BYTES_MAX,
  nextSeqAfterSealed,
  type SegmentInfo,
} from "../format/manifest.ts";
import { segmentFileName } from "../format/segment.ts";
import { type ObjectStore, StoreError } from "./object_store.ts";

/** The manifest object's name under the prefix. */
export const MANIFEST_OBJECT = "manifest.json";
/** Waits between attempts of one object upload that failed for a transient reason. */
export const UPLOAD_RETRY_DELAYS_MS: readonly number[] = [1_000, 2_000, 4_000, 8_000, 16_000];

function hex16(value: number): string {
  return value.toString(16).padStart(16, "0");
}

/** `segments/<16 hex first seq>-<16 hex last seq>.seg`: `ls` order is log order. */
export function segmentObjectName(info: SegmentInfo): string {
  return `segments/${hex16(info.firstSeq)}-${hex16(info.lastSeq)}.seg`;
}

/** `base/<file>` (the base file name is unique per snapshot). */
export function baseObjectName(file: string): string {
  return `base/${file}`;
}

/** `levels/<file>` (level files are named by their cut seq). */
export function levelObjectName(file: string): string {
  return `levels/${file}`;
}

/** A logdir in object storage: a store and the key prefix the logdir lives under. */
export interface StoreLogdir {
  store: ObjectStore;
  /** Key prefix without trailing slash ("" for the bucket's root). */
  prefix: string;
}

/** The full key of `name` under the logdir's prefix. */
export function objectKey(target: StoreLogdir, name: string): string {
  return target.prefix === "" ? name : `${target.prefix}/${name}`;
}

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
  /** Who sealed the live segment: `ship` (this process), `watch` (on request) or `none`. */
  sealedVia: "ship" | "watch" | "none";
  /** Why the live segment could not be sealed (its entries were not shipped). */
  sealNote?: string;
  durationMs: number;
}

interface Upload {
  name: string;
  path: string;
  sizeBytes: number;
}

/**
 * Uploads `logdir` to object storage: seals the live segment (through a running `watch`, or as a
 * momentary writer), then uploads the base, levels and sealed segments the store lacks, then the
 * manifest. Objects already there are never uploaded again, so an interrupted ship resumes.
 * Holds the logdir's compaction lock meanwhile, so no file it uploads is removed under it.
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
  const startedMs = performance.now();
  await readManifest(logdir); // a clear error for a path that is not a logdir
  // The store is checked before anything local changes (sealing rotates the live segment).
  await target.store.check();
  const remote = await readStoreManifest(target);
  const lock = await LogdirLock.acquire(logdir, "ship to object storage", {
    file: COMPACT_LOCK_FILE,
    heldBy: "a compaction is running",
  });
  try {
    const seal = await sealLiveSegment(logdir, "ship");
    const manifest = await readManifest(logdir);
    if (remote !== undefined && remote.logdirId !== manifest.logdirId) {
      throw new UsageError(
        `Cannot ship ${logdir} to ${target.store.describe(objectKey(target, ""))}: it holds ` +
          `another logdir (id ${remote.logdirId}, host ${remote.hostId})`,
        { hint: "ship each logdir to its own prefix" },
      );
    }
    const uploads = plannedUploads(logdir, manifest);
    const present = new Map<string, number>();
    for await (const item of target.store.list(objectKey(target, ""))) {
      present.set(item.key, item.sizeBytes);
    }
    const result = await uploadMissing(target, uploads, present, options);
    const manifestText = encodeManifest(manifest);
    const manifestUploaded = remote === undefined || encodeManifest(remote) !== manifestText;
    if (manifestUploaded) {
      await withRetry(
        target.store.describe(objectKey(target, MANIFEST_OBJECT)),
        () => target.store.put(objectKey(target, MANIFEST_OBJECT), encodeText(manifestText)),
        options,
      );
    }
    return {
      target: target.store.describe(objectKey(target, "")).replace(/\/$/, ""),
      logdirId: manifest.logdirId,
      hostId: manifest.hostId,
      lastSeq: nextSeqAfterSealed(manifest) - 1,
      segments: manifest.segments.length,
      levels: manifest.levels.length,
      ...result,
      manifestUploaded,
      sealedVia: seal.via === "compact" ? "ship" : seal.via,
      sealNote: seal.via === "none" ? seal.warning ?? seal.note : undefined,
      durationMs: Math.round(performance.now() - startedMs),
    };
  } finally {
    lock.release();
  }
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
 * it) until `signal` aborts. A transient store failure skips to the next round; anything else
 * ends the loop with its error. Returns the last successful round.
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
  let last: ShipToStoreResult | undefined;
  for (let round = 1; !options.signal.aborted; round++) {
    const startedMs = performance.now();
    try {
      last = await shipToStore(logdir, target, options);
      options.onRound?.({ ...last, round, lagMs: Math.round(performance.now() - startedMs) });
    } catch (error) {
      if (!(error instanceof StoreError) || !error.transient) throw error;
      options.onRoundError?.(error);
    }
    const waitMs = Math.max(0, options.maxLagMs - (performance.now() - startedMs));
    await abortableSleep(waitMs, options.signal);
  }
  return last;
}

function abortableSleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
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
  for (const segment of manifest.segments) {
    uploads.push({
      name: segmentObjectName(segment),
      path: join(logdir, SEGMENTS_DIR, segment.file),
      sizeBytes: segment.sizeBytes,
    });
  }
  return uploads;
}

async function uploadMissing(
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
      await new Promise((resolve) => setTimeout(resolve, delaysMs[index]));
    }
  }
}

function encodeText(text: string): Uint8Array {
  return new TextEncoder().encode(text);
}

/** The manifest the store holds under the prefix, or undefined when there is none. */
export async function readStoreManifest(target: StoreLogdir): Promise<Manifest | undefined> {
  const key = objectKey(target, MANIFEST_OBJECT);
  const bytes = await target.store.get(key);
  if (bytes === undefined) return undefined;
  if (bytes.length > MANIFEST_BYTES_MAX) {
    throw new IntegrityError(`Manifest ${target.store.describe(key)} is too large`);
  }
  return decodeManifest(new TextDecoder().decode(bytes), target.store.describe(key));
}

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
 * import { withLocalCopy } from "./store_logdir.ts";
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
