/**
 * Restore from a logdir in object storage: {@linkcode restoreFromStore} fetches only the levels
 * and segments the restore point needs (parallel ranged GETs, into a temporary local logdir) and
 * streams the base object straight into the output, so the largest object is written once and
 * never stored on the way.
 *
 * @module
 */
import * as fs from "node:fs";
import { assert } from "../_assert.ts";
import { crc32c, crc32cCombine, crc32cHex } from "../checksum.ts";
import { UsageError } from "../errors.ts";
import type { Manifest } from "../format/manifest.ts";
import { type BaseWriter, restoreAt, type RestoreOptions, type RestoreResult } from "../restore.ts";
import { writeNonZeroRuns } from "../sparse_copy.ts";
import { GET_PART_BYTES, getRanged } from "./_ranged_get.ts";
import { copyNeedFor, withConsistentStoreRead, withLocalCopyOf } from "./store_copy.ts";
import { baseObjectName, MANIFEST_OBJECT, objectKey, type StoreLogdir } from "./store_logdir.ts";

/** Options of {@linkcode restoreFromStore}. */
export interface StoreRestoreOptions extends Omit<RestoreOptions, "base"> {
  /** Parent folder of the temporary copy of levels and segments (default: the system's). */
  cacheDir?: string;
  /** Bytes per ranged GET (default {@linkcode GET_PART_BYTES}). */
  partBytes?: number;
  /** Ranged GETs in flight at once (default {@linkcode GETS_IN_FLIGHT_MAX}). */
  getsInFlightMax?: number;
}

/** What {@linkcode restoreFromStore} produced, and what it downloaded. */
export interface StoreRestoreResult extends RestoreResult {
  /** Objects downloaded by the attempt that succeeded (the base, levels and segments). */
  objectsDownloaded: number;
  bytesDownloaded: number;
  /** Sealed segments the store's manifest lists, and how many of them were fetched. */
  segmentsListed: number;
  segmentsFetched: number;
  /** 1, or more when a compaction swapped the store's manifest during the restore. */
  attempts: number;
}

/**
 * Writes the image of the logdir in object storage at `source` as of `options.at` to `output`
 * (as {@linkcode restoreAt} does for a local logdir). Only the levels and the segments that hold
 * entries up to the point are downloaded; the base object goes straight into the output, its
 * CRC32C checked on the way. When an object is missing because a compaction replaced the store's
 * manifest meanwhile, the restore starts over from the new manifest.
 *
 * @example
 * ```ts
 * import { S3Store } from "./s3_store.ts";
 * import { restoreFromStore } from "./store_restore.ts";
 * import { parseTime } from "../time.ts";
 * const store = new S3Store("backups", { endpoint: "http://127.0.0.1:8080" });
 * const result = await restoreFromStore({ store, prefix: "vm1" }, "/tmp/vm1.img", {
 *   at: parseTime("-2h"),
 * });
 * console.log(`${result.segmentsFetched} of ${result.segmentsListed} segments fetched`);
 * ```
 */
export async function restoreFromStore(
  source: StoreLogdir,
  output: string,
  options: StoreRestoreOptions = {},
): Promise<StoreRestoreResult> {
  const startedMs = performance.now();
  await source.store.check();
  if (options.force !== true && fs.existsSync(output)) {
    // Refused before any download, as restoreAt would after it.
    throw new UsageError(`Cannot restore to ${output}: it already exists`, {
      hint: "pass --force to overwrite it",
    });
  }
  const need = copyNeedFor(options.at);
  const { onProgress } = options;
  return await withConsistentStoreRead(source, (remote, attempt) => {
    // Progress: the levels and segments, then the base and the entries as restoreAt counts them.
    let fetchBytes = 0;
    return withLocalCopyOf(source, remote, need, async (copy) => {
      fetchBytes = copy.bytesDownloaded;
      const result = await restoreAt(copy.logdir, output, {
        ...options,
        base: streamBase(source, remote, options),
        onProgress: (done, total) => onProgress?.(fetchBytes + done, fetchBytes + total),
      });
      return {
        ...result,
        objectsDownloaded: copy.objectsDownloaded + 1,
        bytesDownloaded: copy.bytesDownloaded + remote.deviceBytes,
        segmentsListed: copy.segmentsListed,
        segmentsFetched: copy.segmentsFetched,
        attempts: attempt,
        durationMs: Math.round(performance.now() - startedMs),
      };
    }, {
      cacheDir: options.cacheDir,
      skipBase: true,
      partBytes: options.partBytes,
      getsInFlightMax: options.getsInFlightMax,
      onProgress: (done, total) => onProgress?.(done, total + remote.deviceBytes),
    });
  });
}

/**
 * The restore's base writer: the base object of `remote` in parallel ranged GETs, each part
 * written where it belongs (all-zero blocks left as holes where the target's holes read as
 * zeroes). The CRC32C of the whole image is combined from the parts' in offset order.
 */
function streamBase(
  source: StoreLogdir,
  remote: Manifest,
  options: StoreRestoreOptions,
): BaseWriter {
  return async (target, onProgress) => {
    const partBytes = options.partBytes ?? GET_PART_BYTES;
    const sizeBytes = remote.deviceBytes;
    // One number per part (131 072 for 1 TiB in 8 MiB parts), combined once all are in.
    const partCrcs = new Uint32Array(Math.ceil(sizeBytes / partBytes));
    let dataBytes = 0;
    let doneBytes = 0;
    await getRanged(source.store, [{
      key: objectKey(source, baseObjectName(remote.base.file)),
      sizeBytes,
      onPart: (offsetBytes, bytes) => {
        partCrcs[offsetBytes / partBytes] = crc32c(bytes);
        dataBytes += writeNonZeroRuns(bytes, offsetBytes, target);
      },
    }], {
      partBytes,
      inFlightMax: options.getsInFlightMax,
      namedBy: source.store.describe(objectKey(source, MANIFEST_OBJECT)),
      onPart: (lengthBytes) => {
        doneBytes += lengthBytes;
        onProgress(doneBytes);
      },
    });
    assert(doneBytes === sizeBytes, "every part of the base arrived");
    let crc = 0;
    for (let index = 0; index < partCrcs.length; index++) {
      const lengthBytes = Math.min(partBytes, sizeBytes - index * partBytes);
      crc = crc32cCombine(crc, partCrcs[index], lengthBytes);
    }
    return { dataBytes, crc32c: crc32cHex(crc) };
  };
}
