/**
 * A throwaway writable layer over a {@linkcode PastView}: `serve --writable-overlay DIR` lets a
 * client boot or fsck a past state without touching the logdir. Writes go to a sparse file in DIR
 * that is unlinked as soon as it is created (nothing is left behind, even after kill -9); a
 * bitmap of 512-byte sectors says which ones the overlay holds, and reads take those from the
 * overlay and the rest from the view.
 *
 * Memory grows with the sectors written (one bit each, in 1 MiB buckets allocated on first
 * write), never with the device size.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { assert } from "./_assert.ts";
import { UsageError } from "./errors.ts";
import { readFully, writeFully } from "./fd_io.ts";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "./nbd/backend.ts";
import type { PastView } from "./past_view.ts";

/** Granularity of the overlay: a partly written sector is first copied up whole. */
export const OVERLAY_SECTOR_BYTES = 512;
const BUCKET_BYTES = 1024 * 1024;
const SECTORS_PER_BUCKET = BUCKET_BYTES / OVERLAY_SECTOR_BYTES;
const ZERO_CHUNK_BYTES = 1024 * 1024;
const zeroChunk = new Uint8Array(ZERO_CHUNK_BYTES);

/**
 * A writable {@linkcode BlockBackend} whose writes land in a throwaway file, over a read-only
 * view of the past.
 *
 * @example
 * ```ts ignore
 * import { OverlayBackend } from "./overlay.ts";
 * import { PastView } from "./past_view.ts";
 * const view = await PastView.open("/var/lib/sectorlog/vm1");
 * const overlay = OverlayBackend.create(view, "/var/tmp");
 * await overlay.write(0, new Uint8Array(4096));
 * overlay.close();
 * view.close();
 * ```
 */
export class OverlayBackend implements BlockBackend {
  readonly sizeBytes: number;
  readonly readOnly = false;
  /** One overlay file and one map serve every connection, so writes are visible to all at once. */
  readonly canMultiConn = true;
  #view: PastView;
  #fd: number;
  #buckets = new Map<number, Uint8Array>();
  #sectorBuffer = new Uint8Array(OVERLAY_SECTOR_BYTES);
  #writtenSectors = 0;
  #closed = false;

  private constructor(view: PastView, fd: number) {
    this.#view = view;
    this.#fd = fd;
    this.sizeBytes = view.sizeBytes;
  }

  /** Creates the overlay file in `dir` (unlinked at once) over `view`. */
  static create(view: PastView, dir: string): OverlayBackend {
    const path = join(dir, `sectorlog-overlay-${Deno.pid}-${crypto.randomUUID()}.img`);
    let fd: number;
    try {
      fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL);
    } catch (error) {
      throw new UsageError(
        `Cannot create a writable overlay in ${dir}: ${(error as Error).message}`,
        { hint: "--writable-overlay needs a writable directory", cause: error },
      );
    }
    fs.unlinkSync(path);
    fs.ftruncateSync(fd, view.sizeBytes);
    return new OverlayBackend(view, fd);
  }

  /** Bytes the overlay holds (whole sectors). */
  get overlayBytes(): number {
    return this.#writtenSectors * OVERLAY_SECTOR_BYTES;
  }

  /** Reads written sectors from the overlay and the rest from the view. */
  async read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    assert(!this.#closed, "read from a closed overlay");
    if (this.#writtenSectors === 0) return await this.#view.read(offsetBytes, buffer);
    const end = offsetBytes + buffer.length;
    const lower: Promise<void>[] = [];
    let position = offsetBytes;
    while (position < end) {
      const inOverlay = this.#has(Math.floor(position / OVERLAY_SECTOR_BYTES));
      let runEnd = Math.min(
        end,
        (Math.floor(position / OVERLAY_SECTOR_BYTES) + 1) * OVERLAY_SECTOR_BYTES,
      );
      while (runEnd < end && this.#has(runEnd / OVERLAY_SECTOR_BYTES) === inOverlay) {
        runEnd = Math.min(end, runEnd + OVERLAY_SECTOR_BYTES);
      }
      const target = buffer.subarray(position - offsetBytes, runEnd - offsetBytes);
      if (inOverlay) readFully(this.#fd, target, target.length, position);
      else lower.push(this.#view.read(position, target));
      position = runEnd;
    }
    const outcomes = await Promise.allSettled(lower);
    const failed = outcomes.find((outcome) => outcome.status === "rejected");
    if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
  }

  /** Writes `data` into the overlay (synchronously, so partial sectors copy up atomically). */
  write(offsetBytes: number, data: Uint8Array, _options?: BackendWriteOptions): Promise<void> {
    this.#writeSync(offsetBytes, data);
    return Promise.resolve();
  }

  /** Writes zeroes into the overlay. */
  zero(offsetBytes: number, lengthBytes: number, _options?: BackendZeroOptions): Promise<void> {
    for (let done = 0; done < lengthBytes; done += ZERO_CHUNK_BYTES) {
      const chunk = Math.min(ZERO_CHUNK_BYTES, lengthBytes - done);
      this.#writeSync(offsetBytes + done, zeroChunk.subarray(0, chunk));
    }
    return Promise.resolve();
  }

  /** Discards into the overlay: the range reads back as zeroes. */
  trim(offsetBytes: number, lengthBytes: number, options?: BackendWriteOptions): Promise<void> {
    return this.zero(offsetBytes, lengthBytes, options);
  }

  /** Nothing to make durable: the overlay is thrown away. */
  flush(): Promise<void> {
    return Promise.resolve();
  }

  /** Closes the overlay file; its blocks are freed (it was never linked). Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    fs.closeSync(this.#fd);
  }

  #writeSync(offsetBytes: number, data: Uint8Array): void {
    assert(!this.#closed, "write to a closed overlay");
    const end = offsetBytes + data.length;
    assert(end <= this.sizeBytes, `overlay write ${offsetBytes}+${data.length} past the end`);
    const firstSector = Math.floor(offsetBytes / OVERLAY_SECTOR_BYTES);
    const lastSector = Math.floor((end - 1) / OVERLAY_SECTOR_BYTES);
    this.#copyUp(firstSector, offsetBytes, end);
    if (lastSector !== firstSector) this.#copyUp(lastSector, offsetBytes, end);
    writeFully(this.#fd, data, data.length, offsetBytes);
    for (let sector = firstSector; sector <= lastSector; sector++) this.#mark(sector);
  }

  /** Copies a sector the write covers only partly from the view into the overlay first. */
  #copyUp(sector: number, writeStart: number, writeEnd: number): void {
    const sectorStart = sector * OVERLAY_SECTOR_BYTES;
    const sectorEnd = Math.min(sectorStart + OVERLAY_SECTOR_BYTES, this.sizeBytes);
    if (this.#has(sector) || (writeStart <= sectorStart && writeEnd >= sectorEnd)) return;
    const bytes = this.#sectorBuffer.subarray(0, sectorEnd - sectorStart);
    this.#view.readSync(sectorStart, bytes);
    writeFully(this.#fd, bytes, bytes.length, sectorStart);
  }

  #has(sector: number): boolean {
    const bits = this.#buckets.get(Math.floor(sector / SECTORS_PER_BUCKET));
    if (bits === undefined) return false;
    const bit = sector % SECTORS_PER_BUCKET;
    return (bits[bit >> 3] & (1 << (bit & 7))) !== 0;
  }

  #mark(sector: number): void {
    const bucket = Math.floor(sector / SECTORS_PER_BUCKET);
    let bits = this.#buckets.get(bucket);
    if (bits === undefined) {
      bits = new Uint8Array(SECTORS_PER_BUCKET / 8);
      this.#buckets.set(bucket, bits);
    }
    const bit = sector % SECTORS_PER_BUCKET;
    if ((bits[bit >> 3] & (1 << (bit & 7))) === 0) this.#writtenSectors++;
    bits[bit >> 3] |= 1 << (bit & 7);
  }
}
