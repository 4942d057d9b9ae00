/**
 * Leases: who may write what under a logdir's prefix in object storage. A lease is a small JSON
 * object `leases/<name>.json` naming its owner (a random id, the host, the pid, the command) and
 * an expiry; the owner renews it while it works and deletes it when done. Another process that
 * finds an unexpired lease of someone else is refused (or waits, for short leases); an expired
 * one (its owner died) is taken over.
 *
 * Taking a lease is atomic where the store does conditional writes (`If-None-Match: *` to create,
 * `If-Match: <etag>` to take over or renew: AWS S3, MinIO, Ceph RGW). Where it does not (Swift's
 * s3api answers 501), the lease is written plainly, read back after {@linkcode LEASE_SETTLE_MS}
 * and kept only if it still names this owner: two processes that start within that window of
 * each other can both see their own write at first, so the check is repeated at every renewal,
 * and the loser stops at its next {@linkcode StoreLease.assertHeld}. That is best effort, as
 * docs/FORMAT.md says; the manifest protocol keeps the log consistent either way.
 *
 * @module
 */
import { hostname } from "node:os";
import { assert } from "../_assert.ts";
import { BusyError, IntegrityError } from "../errors.ts";
import { sleep } from "../sleep.ts";
import { formatTimeUtc, nowUs } from "../time.ts";
import { StoreError } from "./object_store.ts";
import { objectKey, type StoreLogdir } from "./layout.ts";

/** A lease not renewed for this long has expired (its owner is taken for dead). */
export const LEASE_TTL_MS = 30_000;
/** The owner renews its lease this often. */
export const LEASE_RENEW_MS = 10_000;
/** Without conditional writes: wait this long after writing a lease before reading it back. */
export const LEASE_SETTLE_MS = 100;
/** A waiting {@linkcode StoreLease.acquire} looks again this often. */
const LEASE_POLL_MS = 250;
/** Lease objects are tiny; anything larger is not one of ours. */
const LEASE_BYTES_MAX = 4096;
const LEASE_FORMAT = "sectorlog-lease";

/** The leases of a logdir in object storage. */
export type LeaseName =
  /** Held by `ship` (and `receive --store`) for as long as it runs: one shipper per prefix. */
  | "ship"
  /** Held by `compact` while it runs: one compaction per prefix. */
  | "compact"
  /** Held for a moment around each read-modify-write of the manifest. */
  | "manifest";

/** The JSON of a lease object. */
export interface LeaseRecord {
  format: typeof LEASE_FORMAT;
  /** Random id of the owning process's lease. */
  owner: string;
  purpose: string;
  host: string;
  pid: number;
  acquiredUs: number;
  expiresUs: number;
}

/** Options of {@linkcode StoreLease.acquire}. */
export interface LeaseOptions {
  /** What the owner does, for the message another process gets (`ship`, `compact`). */
  purpose: string;
  /** Wait up to this long for a lease someone else holds (default 0: refuse at once). */
  waitMs?: number;
  ttlMs?: number;
  renewMs?: number;
  /** Renew on a timer while held (default true; false for leases held only for a moment). */
  autoRenew?: boolean;
}

/** The key of lease `name` under `target`. */
export function leaseKey(target: StoreLogdir, name: LeaseName): string {
  return objectKey(target, `leases/${name}.json`);
}

/** A lease this process holds. */
export class StoreLease {
  readonly key: string;
  readonly record: LeaseRecord;
  #target: StoreLogdir;
  #etag: string;
  #conditional: boolean;
  #ttlMs: number;
  #timer: ReturnType<typeof setInterval> | undefined;
  #renewing: Promise<void> | undefined;
  #lost: Error | undefined;
  #released = false;

  private constructor(
    target: StoreLogdir,
    key: string,
    record: LeaseRecord,
    state: { etag: string; conditional: boolean; ttlMs: number },
  ) {
    this.#target = target;
    this.key = key;
    this.record = record;
    this.#etag = state.etag;
    this.#conditional = state.conditional;
    this.#ttlMs = state.ttlMs;
  }

  /**
   * Takes lease `name` of `target`: at once when nobody holds it or its holder's lease expired;
   * otherwise waits up to `options.waitMs`, then throws a {@linkcode BusyError} naming the holder.
   */
  static async acquire(
    target: StoreLogdir,
    name: LeaseName,
    options: LeaseOptions,
  ): Promise<StoreLease> {
    const ttlMs = options.ttlMs ?? LEASE_TTL_MS;
    const renewMs = options.renewMs ?? LEASE_RENEW_MS;
    assert(ttlMs > 0 && renewMs > 0 && renewMs < ttlMs, "lease renewal must come before expiry");
    const key = leaseKey(target, name);
    const deadlineMs = performance.now() + (options.waitMs ?? 0);
    const owner = crypto.randomUUID();
    for (;;) {
      const current = await readLease(target, key);
      const now = nowUs();
      if (current !== undefined && current.record.expiresUs > now) {
        if (performance.now() >= deadlineMs) throw busy(target, key, current.record);
        await sleep(LEASE_POLL_MS);
        continue;
      }
      const record: LeaseRecord = {
        format: LEASE_FORMAT,
        owner,
        purpose: options.purpose,
        host: hostname(),
        pid: Deno.pid,
        acquiredUs: now,
        expiresUs: now + ttlMs * 1000,
      };
      const bytes = encodeLease(record);
      const put = await target.store.putConditional(
        key,
        bytes,
        current === undefined ? { ifNoneMatch: "*" } : { ifMatch: current.etag },
      );
      let etag: string;
      let conditional = true;
      if (put.outcome === "conflict") continue; // someone else took it first: look again
      if (put.outcome === "stored") {
        etag = put.etag;
      } else {
        conditional = false;
        await target.store.put(key, bytes);
        await sleep(LEASE_SETTLE_MS);
        const check = await readLease(target, key);
        if (check === undefined || check.record.owner !== owner) continue; // lost the race
        etag = check.etag;
      }
      const lease = new StoreLease(target, key, record, { etag, conditional, ttlMs });
      if (options.autoRenew !== false) lease.#startRenewing(renewMs);
      return lease;
    }
  }

  /** Throws when the lease was lost (taken over after a missed renewal, or by a racing writer). */
  assertHeld(): void {
    if (this.#lost !== undefined) throw this.#lost;
    if (this.#released) throw new BusyError(`The lease ${this.#describe()} was released`);
    if (nowUs() >= this.record.expiresUs) {
      throw new BusyError(
        `The lease ${this.#describe()} expired at ${formatTimeUtc(this.record.expiresUs)} ` +
          "without a renewal (the store did not answer)",
      );
    }
  }

  /** Renews the lease now (also done on a timer unless autoRenew is off). */
  async renew(): Promise<void> {
    if (this.#renewing !== undefined) return await this.#renewing;
    this.#renewing = this.#renewOnce().finally(() => this.#renewing = undefined);
    await this.#renewing;
  }

  /** Stops renewing and deletes the lease object if it still names this owner. */
  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    if (this.#timer !== undefined) clearInterval(this.#timer);
    await this.#renewing?.catch(() => {});
    try {
      const current = await readLease(this.#target, this.key);
      if (current?.record.owner === this.record.owner) await this.#target.store.delete(this.key);
    } catch {
      // Left in place, it expires by itself after the TTL.
    }
  }

  #startRenewing(renewMs: number): void {
    const timer = setInterval(() => {
      this.renew().catch(() => {/* recorded in #lost, or retried at the next tick */});
    }, renewMs);
    Deno.unrefTimer(timer);
    this.#timer = timer;
  }

  async #renewOnce(): Promise<void> {
    if (this.#released || this.#lost !== undefined) return;
    const now = nowUs();
    const record = { ...this.record, expiresUs: now + this.#ttlMs * 1000 };
    try {
      if (this.#conditional) {
        const put = await this.#target.store.putConditional(this.key, encodeLease(record), {
          ifMatch: this.#etag,
        });
        if (put.outcome === "conflict") return this.#lose(await readLease(this.#target, this.key));
        if (put.outcome === "stored") {
          this.#etag = put.etag;
          this.record.expiresUs = record.expiresUs;
          return;
        }
        this.#conditional = false; // the store stopped doing them: check by reading back
      }
      const current = await readLease(this.#target, this.key);
      if (current?.record.owner !== this.record.owner) return this.#lose(current);
      await this.#target.store.put(this.key, encodeLease(record));
      this.record.expiresUs = record.expiresUs;
    } catch (error) {
      // A store outage: keep the old expiry; assertHeld refuses once it passes.
      if (!(error instanceof StoreError)) throw error;
    }
  }

  #lose(current: { record: LeaseRecord } | undefined): void {
    const holder = current === undefined ? "nobody (it was deleted)" : holderText(current.record);
    this.#lost = new BusyError(`Lost the lease ${this.#describe()}: it is now held by ${holder}`);
    if (this.#timer !== undefined) clearInterval(this.#timer);
  }

  #describe(): string {
    return this.#target.store.describe(this.key);
  }
}

/**
 * Runs `body` holding lease `name`, waiting for it up to `options.waitMs`, and releases it
 * after (also when `body` throws).
 */
export async function withLease<T>(
  target: StoreLogdir,
  name: LeaseName,
  options: LeaseOptions,
  body: (lease: StoreLease) => Promise<T>,
): Promise<T> {
  const lease = await StoreLease.acquire(target, name, options);
  try {
    return await body(lease);
  } finally {
    await lease.release();
  }
}

/** The lease object under `key`, or undefined when there is none. */
export async function readLease(
  target: StoreLogdir,
  key: string,
): Promise<{ record: LeaseRecord; etag: string } | undefined> {
  const got = await target.store.getWithEtag(key);
  if (got === undefined) return undefined;
  const what = target.store.describe(key);
  if (got.bytes.length > LEASE_BYTES_MAX) {
    throw new IntegrityError(`Lease ${what} is ${got.bytes.length} bytes: not a sectorlog lease`, {
      path: what,
    });
  }
  let record: LeaseRecord;
  try {
    record = JSON.parse(new TextDecoder().decode(got.bytes));
  } catch (error) {
    throw new IntegrityError(`Cannot parse lease ${what}: ${(error as Error).message}`, {
      path: what,
      cause: error,
    });
  }
  if (
    record?.format !== LEASE_FORMAT || typeof record.owner !== "string" ||
    !Number.isSafeInteger(record.expiresUs)
  ) {
    throw new IntegrityError(`Invalid lease ${what}: not a ${LEASE_FORMAT} object`, {
      path: what,
    });
  }
  return { record, etag: got.etag };
}

function encodeLease(record: LeaseRecord): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(record) + "\n");
}

function holderText(record: LeaseRecord): string {
  return `${record.purpose} (pid ${record.pid} on ${record.host}, since ${
    formatTimeUtc(record.acquiredUs)
  })`;
}

function busy(target: StoreLogdir, key: string, record: LeaseRecord): BusyError {
  return new BusyError(
    `${target.store.describe(key)} is held by ${holderText(record)} until ${
      formatTimeUtc(record.expiresUs)
    }: stop that process first, or wait for its lease to expire (${LEASE_TTL_MS / 1000}s ` +
      "after it stops renewing)",
    { holderPid: record.host === hostname() ? record.pid : undefined },
  );
}
