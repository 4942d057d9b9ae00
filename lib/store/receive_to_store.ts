/**
 * `receive --store s3://bucket/prefix`: the receiver keeps each host's logdir in its store
 * directory (the spool) and a {@linkcode StoreUploader} copies every host's logdir to
 * `prefix/<host-id>` in object storage in rounds, at most `maxLagMs` apart, so that hosts without
 * cloud credentials still end up in object storage with a bounded lag.
 *
 * Each round, for every host whose copy changed since its last successful upload: the receiver
 * seals the host's live segment (entries acked before the round are then in sealed segments), and
 * {@linkcode shipToStore} uploads what the store lacks, the manifest last. A host that fails (the
 * store is down, a compaction holds the logdir) is tried again the next round; the others go on.
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { BusyError } from "../errors.ts";
import { MANIFEST_FILE } from "../format/logdir.ts";
import { sleep } from "../sleep.ts";
import { StoreError } from "./object_store.ts";
import {
  FOLLOW_MAX_LAG_MS_MAX,
  objectKey,
  shipToStore,
  type ShipToStoreOptions,
  type ShipToStoreResult,
  type StoreLogdir,
} from "./store_logdir.ts";

/** Hosts uploaded at once within a round. */
export const UPLOAD_HOSTS_IN_FLIGHT_MAX = 4;

/** What the uploader needs from the receiver (implemented by `Receiver`). */
export interface HostSealer {
  /** Seals the host's live segment so that every entry received so far is sealed. */
  sealHost(hostId: string): Promise<unknown>;
  /** A number that changes whenever the host's copy gets entries or a new state. */
  hostActivity(hostId: string): number;
}

/** Options of {@linkcode StoreUploader}. */
export interface StoreUploaderOptions {
  /** The receiver whose hosts are uploaded. */
  sealer: HostSealer;
  /** A round starts at most this long after the previous one started (the RPO, 1 s .. 24 h). */
  maxLagMs: number;
  /** Waits between attempts of one object within a round (default none: the next round retries). */
  retryDelaysMs?: readonly number[];
  /** Called before a retry within a round. */
  onRetry?: ShipToStoreOptions["onRetry"];
}

/** How one host fared in a round. */
export interface HostUpload {
  hostId: string;
  /** `s3://bucket/prefix/<host-id>`. */
  target: string;
  /** `uploaded`: the store holds what the host's copy held when the round began. */
  status: "uploaded" | "unchanged" | "failed";
  /** With `uploaded`: what shipToStore did. */
  result?: ShipToStoreResult;
  /** With `failed`: the one-line reason, and whether it is worth retrying (the next round does). */
  error?: string;
  transient?: boolean;
}

/** One round of {@linkcode StoreUploader}. */
export interface UploadRound {
  round: number;
  /** How long the round took: what reached the spool before it began is in the store now. */
  lagMs: number;
  hosts: HostUpload[];
  objectsUploaded: number;
  bytesUploaded: number;
  /** Hosts that failed this round (tried again the next). */
  failed: number;
}

/**
 * Uploads the host logdirs of a receive store directory to object storage, in rounds.
 *
 * @example
 * ```ts ignore
 * import { Receiver } from "../ship/receiver.ts";
 * import { S3Store } from "./s3_store.ts";
 * import { StoreUploader } from "./receive_to_store.ts";
 * const receiver = await Receiver.start({ storedir: "/srv/sectorlog", port: 7420 });
 * const store = new S3Store("backups", { endpoint: "http://127.0.0.1:8080" });
 * const uploader = new StoreUploader("/srv/sectorlog", { store, prefix: "hosts" }, {
 *   sealer: receiver,
 *   maxLagMs: 2_000,
 * });
 * const stop = new AbortController();
 * Deno.addSignalListener("SIGTERM", () => stop.abort());
 * await uploader.follow(stop.signal, (round) => console.error(`${round.lagMs} ms`));
 * await receiver.close();
 * await uploader.round(); // the last entries received
 * ```
 */
export class StoreUploader {
  readonly storedir: string;
  readonly target: StoreLogdir;
  readonly options: StoreUploaderOptions;
  #rounds = 0;
  /** Per host, the change marker of its last successful upload. */
  #uploaded = new Map<string, string>();

  constructor(storedir: string, target: StoreLogdir, options: StoreUploaderOptions) {
    assert(
      options.maxLagMs > 0 && options.maxLagMs <= FOLLOW_MAX_LAG_MS_MAX,
      "maxLagMs out of range",
    );
    this.storedir = storedir;
    this.target = target;
    this.options = options;
  }

  /** Where host `hostId`'s logdir goes: `prefix/<host-id>`. */
  hostTarget(hostId: string): StoreLogdir {
    return { store: this.target.store, prefix: objectKey(this.target, hostId) };
  }

  /**
   * Rounds every `maxLagMs` (back to back when one takes longer) until `signal` aborts; the
   * round in progress then finishes. Failures of hosts are reported in the rounds, not thrown.
   */
  async follow(signal: AbortSignal, onRound?: (round: UploadRound) => void): Promise<void> {
    while (!signal.aborted) {
      const startedMs = performance.now();
      onRound?.(await this.round());
      const waitMs = Math.max(0, this.options.maxLagMs - (performance.now() - startedMs));
      await sleep(waitMs, signal);
    }
  }

  /** One round over every host of the store directory. */
  async round(): Promise<UploadRound> {
    const round = ++this.#rounds;
    const startedMs = performance.now();
    const hostIds = await listHosts(this.storedir);
    const hosts: HostUpload[] = new Array(hostIds.length);
    let next = 0;
    const worker = async () => {
      while (next < hostIds.length) {
        const index = next++;
        hosts[index] = await this.#uploadHost(hostIds[index]);
      }
    };
    const workers = Math.min(UPLOAD_HOSTS_IN_FLIGHT_MAX, hostIds.length);
    await Promise.all(Array.from({ length: workers }, worker));
    let objectsUploaded = 0;
    let bytesUploaded = 0;
    for (const host of hosts) {
      objectsUploaded += host.result?.objectsUploaded ?? 0;
      bytesUploaded += host.result?.bytesUploaded ?? 0;
    }
    return {
      round,
      lagMs: Math.round(performance.now() - startedMs),
      hosts,
      objectsUploaded,
      bytesUploaded,
      failed: hosts.filter((host) => host.status === "failed").length,
    };
  }

  async #uploadHost(hostId: string): Promise<HostUpload> {
    const target = this.hostTarget(hostId);
    const described = target.store.describe(objectKey(target, "")).replace(/\/$/, "");
    const logdir = join(this.storedir, hostId);
    // Read before the seal: entries that arrive during the round move it again.
    const activity = this.options.sealer.hostActivity(hostId);
    try {
      if (this.#uploaded.get(hostId) === await changeMarker(logdir, activity)) {
        return { hostId, target: described, status: "unchanged" };
      }
      await this.options.sealer.sealHost(hostId);
      const marker = await changeMarker(logdir, activity);
      const result = await shipToStore(logdir, target, {
        retryDelaysMs: this.options.retryDelaysMs ?? [],
        onRetry: this.options.onRetry,
      });
      this.#uploaded.set(hostId, marker);
      return { hostId, target: described, status: "uploaded", result };
    } catch (error) {
      this.#uploaded.delete(hostId);
      const transient = (error instanceof StoreError && error.transient) ||
        error instanceof BusyError || error instanceof Deno.errors.NotFound;
      return {
        hostId,
        target: described,
        status: "failed",
        error: error instanceof Error ? error.message : String(error),
        transient,
      };
    }
  }
}

/** The host logdirs of a store directory: folders with a manifest (not `.incoming-…`). */
async function listHosts(storedir: string): Promise<string[]> {
  const hosts: string[] = [];
  for await (const entry of Deno.readDir(storedir)) {
    if (!entry.isDirectory || entry.name.startsWith(".")) continue;
    try {
      await Deno.stat(join(storedir, entry.name, MANIFEST_FILE));
      hosts.push(entry.name);
    } catch {
      // Not a logdir (yet): a first ship still receiving its base.
    }
  }
  return hosts.sort();
}

/**
 * What changes whenever the host's copy does: the receiver's activity counter, and the manifest
 * file (replaced by every seal, compaction and state install).
 */
async function changeMarker(logdir: string, activity: number): Promise<string> {
  const stat = await Deno.stat(join(logdir, MANIFEST_FILE));
  return `${activity}:${stat.ino}:${stat.mtime?.getTime()}:${stat.size}`;
}
