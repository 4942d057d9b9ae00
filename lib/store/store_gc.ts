/**
 * Deleting objects a logdir in object storage no longer needs, after a grace period. When a
 * manifest update (a compaction, a ship that re-bases the store) stops naming objects, the writer
 * records them in a retire record `retired/<16 hex µs>-<8 hex>.json`; a later sweep (every
 * `compact` of the store runs one) deletes the objects of records older than the grace
 * period, unless the current manifest names them again, then the record. A restore that read the
 * old manifest just before the update keeps finding its objects for the whole grace period (and
 * starts over from the new manifest if it takes longer still). The sweep also deletes orphans:
 * data objects no manifest and no record names, left by a ship or compaction killed before its
 * manifest update (see {@linkcode sweepRetired}).
 *
 * @module
 */
import { IntegrityError } from "../errors.ts";
import { nowUs } from "../time.ts";
import { leaseKey, readLease } from "./lease.ts";
import { manifestObjectNames, objectKey, readStoreManifest, type StoreLogdir } from "./layout.ts";

/** Default time between retiring an object and deleting it (`compact --grace`). */
export const RETIRE_GRACE_MS = 60 * 60 * 1000;
/** Folder of the retire records under the prefix. */
export const RETIRED_DIR = "retired";
/** Keys one retire record may list. */
export const RETIRE_RECORD_KEYS_MAX = 100_000;
/** Retire records are bounded by their key count; anything larger is not one of ours. */
const RETIRE_RECORD_BYTES_MAX = 64 * 1024 * 1024;
const RETIRE_FORMAT = "sectorlog-retired";
/** Only data objects are ever retired: the base, levels and segments. */
const RETIRABLE = /^(base|levels|segments)\/[A-Za-z0-9_.-]+$/;
const RECORD_NAME = /^([0-9a-f]{16})-[0-9a-f]{8}\.json$/;

/** The JSON of a retire record. */
export interface RetireRecord {
  format: typeof RETIRE_FORMAT;
  /** When the manifest stopped naming the keys (µs since the epoch). */
  retiredUs: number;
  /** Who retired them (`compact`, `manifest update`). */
  by: string;
  /** Full object keys. */
  keys: string[];
}

/** Records `keys` as retired now: a sweep deletes them once the grace period has passed. */
export async function retireObjects(
  target: StoreLogdir,
  keys: string[],
  by: string,
  retiredUs: number = nowUs(),
): Promise<void> {
  for (let start = 0; start < keys.length; start += RETIRE_RECORD_KEYS_MAX) {
    const record: RetireRecord = {
      format: RETIRE_FORMAT,
      retiredUs,
      by,
      keys: keys.slice(start, start + RETIRE_RECORD_KEYS_MAX),
    };
    const random = crypto.getRandomValues(new Uint32Array(1))[0].toString(16).padStart(8, "0");
    const name = `${RETIRED_DIR}/${retiredUs.toString(16).padStart(16, "0")}-${random}.json`;
    await target.store.put(
      objectKey(target, name),
      new TextEncoder().encode(JSON.stringify(record) + "\n"),
    );
  }
}

/** Allowance for the store's clock (object times) against the writers' clocks (lease times). */
export const CLOCK_SKEW_MS_MAX = 5 * 60 * 1000;

/** What {@linkcode sweepRetired} did. */
export interface SweepResult {
  /** Retire records whose grace period had passed, handled and removed. */
  records: number;
  objectsDeleted: number;
  /** Retired objects the current manifest names again (a re-based ship): kept. */
  objectsKept: number;
  /** Retire records still in their grace period. */
  recordsWaiting: number;
  /**
   * Objects named by no manifest and no retire record (left by a ship or compaction killed before
   * its manifest update), older than the grace period: deleted.
   */
  orphansDeleted: number;
}

/**
 * Deletes the objects of every retire record older than `graceMs` that the store's current
 * manifest does not name, then the record.
 */
export async function sweepRetired(
  target: StoreLogdir,
  options: { graceMs: number; nowUs?: number },
): Promise<SweepResult> {
  const result: SweepResult = {
    records: 0,
    objectsDeleted: 0,
    objectsKept: 0,
    recordsWaiting: 0,
    orphansDeleted: 0,
  };
  const dueUs = (options.nowUs ?? nowUs()) - options.graceMs * 1000;
  const due: string[] = [];
  const waiting: string[] = [];
  const folder = objectKey(target, `${RETIRED_DIR}/`);
  for await (const item of target.store.list(folder)) {
    const match = RECORD_NAME.exec(item.key.slice(folder.length));
    if (match === null) continue; // not ours: left alone
    if (parseInt(match[1], 16) <= dueUs) due.push(item.key);
    else waiting.push(item.key);
  }
  result.recordsWaiting = waiting.length;
  const manifest = await readStoreManifest(target);
  const named = new Set(
    [...(manifest === undefined ? [] : manifestObjectNames(manifest))].map((name) =>
      objectKey(target, name)
    ),
  );
  for (const recordKey of due) {
    const record = await readRecord(target, recordKey);
    for (const key of record?.keys ?? []) {
      if (named.has(key)) {
        result.objectsKept++;
        continue;
      }
      await target.store.delete(key);
      result.objectsDeleted++;
    }
    await target.store.delete(recordKey);
    result.records++;
  }
  if (manifest !== undefined) {
    result.orphansDeleted = await sweepOrphans(target, named, waiting, dueUs);
  }
  return result;
}

/**
 * Deletes the data objects (`base/`, `levels/`, `segments/`) that the manifest (`named`) and the
 * waiting retire records do not name and that were written before `dueUs`, and before the
 * current ship lease was taken (a ship uploads its objects before its manifest update names
 * them). Such objects are what a ship or compaction killed before its manifest update left.
 */
async function sweepOrphans(
  target: StoreLogdir,
  named: Set<string>,
  waitingRecords: string[],
  dueUs: number,
): Promise<number> {
  let beforeUs = dueUs;
  const ship = await readLease(target, leaseKey(target, "ship"));
  if (ship !== undefined && ship.record.expiresUs > nowUs()) {
    beforeUs = Math.min(beforeUs, ship.record.acquiredUs - CLOCK_SKEW_MS_MAX * 1000);
  }
  const pending = new Set<string>();
  for (const recordKey of waitingRecords) {
    for (const key of (await readRecord(target, recordKey))?.keys ?? []) pending.add(key);
  }
  const prefix = objectKey(target, "");
  let deleted = 0;
  for (const folder of ["base/", "levels/", "segments/"]) {
    for await (const item of target.store.list(prefix + folder)) {
      if (named.has(item.key) || pending.has(item.key)) continue;
      if (!RETIRABLE.test(item.key.slice(prefix.length))) continue; // not a name of ours
      if (item.lastModifiedMs === undefined || item.lastModifiedMs * 1000 >= beforeUs) continue;
      await target.store.delete(item.key);
      deleted++;
    }
  }
  return deleted;
}

async function readRecord(target: StoreLogdir, key: string): Promise<RetireRecord | undefined> {
  const bytes = await target.store.get(key);
  if (bytes === undefined) return undefined; // another sweep got there first
  const what = target.store.describe(key);
  if (bytes.length > RETIRE_RECORD_BYTES_MAX) {
    throw new IntegrityError(`Retire record ${what} is too large`, { path: what });
  }
  let record: RetireRecord;
  try {
    record = JSON.parse(new TextDecoder().decode(bytes));
  } catch (error) {
    throw new IntegrityError(`Cannot parse retire record ${what}: ${(error as Error).message}`, {
      path: what,
      cause: error,
    });
  }
  const prefix = objectKey(target, "");
  if (
    record?.format !== RETIRE_FORMAT || !Array.isArray(record.keys) ||
    // A record may only ever delete objects of its own logdir.
    !record.keys.every((key) =>
      typeof key === "string" && key.startsWith(prefix) &&
      RETIRABLE.test(key.slice(prefix.length))
    )
  ) {
    throw new IntegrityError(`Invalid retire record ${what}: not a ${RETIRE_FORMAT} object`, {
      path: what,
    });
  }
  return record;
}
