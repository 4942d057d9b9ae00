/**
 * Restore in place: put the watched device itself back to its state at a point in time, writing
 * only what differs, through the log-assisted disk. Every write of the restore is journaled like
 * any other, and a mark `restored-to:<time>` follows them, so the log still describes the device
 * and the restore can itself be undone by restoring to the seq just before it.
 *
 * Why only the ranges written after the point: the device equals the log's latest state (the
 * log-assisted disk guarantees it for a device that only `watch` writes, and re-applies the
 * journal's unflushed tail when it opens), so a byte nothing wrote after the point still holds
 * its value at the point. Those ranges come from {@linkcode diffLogdir}; within them, blocks whose
 * bytes already equal the old state are compared and skipped, not written. `verify` checks the
 * precondition afterwards by comparing the whole device with the view of the past.
 *
 * @module
 */
import { BusyError, IntegrityError } from "./errors.ts";
import { diffLogdir } from "./diff.ts";
import { LogAssistedDisk } from "./disk.ts";
import { PastView } from "./past_view.ts";
import { isAllZero } from "./sparse_copy.ts";
import { formatTimeUtc, type TimeSpec } from "./time.ts";

/** Bytes compared and written per step. */
const CHUNK_BYTES = 1024 * 1024;
/** Granularity at which equal bytes are skipped: runs of differing blocks are written. */
const BLOCK_BYTES = 4096;

/** Options of {@linkcode restoreInPlace}. */
export interface InPlaceRestoreOptions {
  /** The point to restore to (default: the latest state, which changes nothing). */
  at?: TimeSpec;
  /** Round down to the last flush at or before the point. */
  toFlush?: boolean;
  /** The present, for refusing future times (default: the wall clock). */
  nowUs?: number;
  /** After writing, compare the whole device with the state at the point (reads it all). */
  verify?: boolean;
  /** Wall clock in µs for the journal (tests inject one). */
  clock?: () => number;
  /** Called as candidate bytes are compared; the total is the candidate bytes. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

/** What {@linkcode restoreInPlace} did. */
export interface InPlaceRestoreResult {
  logdir: string;
  device: string;
  /** The time the device now represents. */
  targetUs: number;
  /** Seq of the last entry of the state restored. */
  targetSeq: number;
  /**
   * Seq of the last entry before the restore's own entries: `restore --at seq:<beforeSeq>` gives
   * the device as it was just before the restore (undo).
   */
  beforeSeq: number;
  /** Ranges written after the point (the only ones that can differ), and their bytes. */
  candidateRanges: number;
  candidateBytes: number;
  /** Runs of differing blocks written (journaled), and their bytes. */
  rangesWritten: number;
  bytesWritten: number;
  /** Candidate bytes that already held the old state (compared, not written). */
  bytesUnchanged: number;
  /** The mark that records the restore. */
  mark: { name: string; seq: number; timeUs: number };
  /** Set with `verify`: the whole device was compared with the state at the point. */
  verifiedBytes?: number;
  durationMs: number;
}

/**
 * Restores `devicePath`, the device that `watch` journals into `logdir`, to its state at
 * `options.at`, while `watch` is stopped (the logdir lock is taken; a running watch makes this a
 * {@linkcode BusyError}).
 *
 * @example
 * ```ts ignore
 * import { restoreInPlace } from "./restore_in_place.ts";
 * import { parseTime } from "./time.ts";
 * const result = await restoreInPlace("/var/lib/sectorlog/vm1", "/dev/loop3", {
 *   at: parseTime("mark:before-upgrade"),
 * });
 * console.log(`undo with --at seq:${result.beforeSeq}`);
 * ```
 */
export async function restoreInPlace(
  logdir: string,
  devicePath: string,
  options: InPlaceRestoreOptions = {},
): Promise<InPlaceRestoreResult> {
  const startedMs = performance.now();
  const disk = await openDisk(devicePath, logdir, options.clock);
  try {
    const beforeSeq = disk.writer!.nextSeq - 1;
    using view = await PastView.open(logdir, options);
    const changed = await diffLogdir(logdir, {
      from: { kind: "seq", seq: view.info.targetSeq },
      to: { kind: "seq", seq: beforeSeq },
      nowUs: options.nowUs,
    });
    const result: InPlaceRestoreResult = {
      logdir,
      device: devicePath,
      targetUs: view.info.targetUs,
      targetSeq: view.info.targetSeq,
      beforeSeq,
      candidateRanges: changed.ranges.length,
      candidateBytes: changed.changedBytes,
      rangesWritten: 0,
      bytesWritten: 0,
      bytesUnchanged: 0,
      mark: { name: "", seq: 0, timeUs: 0 },
      durationMs: 0,
    };
    const copier = new DifferenceWriter(disk, view, result);
    let doneBytes = 0;
    for (const range of changed.ranges) {
      const end = range.offsetBytes + range.lengthBytes;
      for (let offset = range.offsetBytes; offset < end; offset += CHUNK_BYTES) {
        const lengthBytes = Math.min(CHUNK_BYTES, end - offset);
        await copier.restoreChunk(offset, lengthBytes);
        doneBytes += lengthBytes;
        options.onProgress?.(doneBytes, changed.changedBytes);
      }
    }
    await disk.flush();
    const name = `restored-to:${formatTimeUtc(view.info.targetUs)}`;
    const header = await disk.mark(name);
    result.mark = { name, seq: header.seq, timeUs: header.timeUs };
    if (options.verify === true) result.verifiedBytes = compareWhole(disk, view);
    result.durationMs = Math.round(performance.now() - startedMs);
    return result;
  } finally {
    await disk.close();
  }
}

async function openDisk(
  devicePath: string,
  logdir: string,
  clock: (() => number) | undefined,
): Promise<LogAssistedDisk> {
  try {
    return await LogAssistedDisk.open(devicePath, logdir, { purpose: "restore in place", clock });
  } catch (error) {
    if (!(error instanceof BusyError)) throw error;
    throw new BusyError(
      `${error.message}; stop watch first (an in-place restore journals its own writes)`,
      { holderPid: error.holderPid },
    );
  }
}

/** Compares chunks of the device with the old state and writes runs of differing blocks. */
class DifferenceWriter {
  #disk: LogAssistedDisk;
  #view: PastView;
  #result: InPlaceRestoreResult;
  #old = new Uint8Array(CHUNK_BYTES);
  #current = new Uint8Array(CHUNK_BYTES);
  /** End of the last run written, so a run continuing it across chunks counts once. */
  #lastRunEnd = -1;

  constructor(disk: LogAssistedDisk, view: PastView, result: InPlaceRestoreResult) {
    this.#disk = disk;
    this.#view = view;
    this.#result = result;
  }

  async restoreChunk(offsetBytes: number, lengthBytes: number): Promise<void> {
    const old = this.#old.subarray(0, lengthBytes);
    const current = this.#current.subarray(0, lengthBytes);
    this.#view.readSync(offsetBytes, old);
    this.#disk.readSync(offsetBytes, current);
    let runStart = -1;
    for (let block = 0; block < lengthBytes; block += BLOCK_BYTES) {
      const blockEnd = Math.min(lengthBytes, block + BLOCK_BYTES);
      const differs = !bytesEqual(old, current, block, blockEnd);
      if (differs && runStart < 0) runStart = block;
      if (!differs) {
        this.#result.bytesUnchanged += blockEnd - block;
        if (runStart >= 0) await this.#writeRun(offsetBytes, old, runStart, block);
        runStart = -1;
      }
    }
    if (runStart >= 0) await this.#writeRun(offsetBytes, old, runStart, lengthBytes);
  }

  async #writeRun(chunkOffsetBytes: number, old: Uint8Array, start: number, end: number) {
    const offsetBytes = chunkOffsetBytes + start;
    const data = old.subarray(start, end);
    if (isAllZero(data)) await this.#disk.zero(offsetBytes, data.length);
    else await this.#disk.write(offsetBytes, data);
    if (offsetBytes !== this.#lastRunEnd) this.#result.rangesWritten++;
    this.#lastRunEnd = offsetBytes + data.length;
    this.#result.bytesWritten += data.length;
  }
}

/** Reads the whole device and the view and throws where they first differ. */
function compareWhole(disk: LogAssistedDisk, view: PastView): number {
  const old = new Uint8Array(CHUNK_BYTES);
  const current = new Uint8Array(CHUNK_BYTES);
  for (let offset = 0; offset < view.sizeBytes; offset += CHUNK_BYTES) {
    const lengthBytes = Math.min(CHUNK_BYTES, view.sizeBytes - offset);
    view.readSync(offset, old.subarray(0, lengthBytes));
    disk.readSync(offset, current.subarray(0, lengthBytes));
    for (let i = 0; i < lengthBytes; i++) {
      if (old[i] !== current[i]) {
        throw new IntegrityError(
          `Device ${disk.device.path} differs from the restored state at offset ${
            offset + i
          }: something other than watch wrote the device, so writing only the ranges the log changed was not enough; restore the whole image onto it with \`sectorlog restore ${view.info.logdir} ${disk.device.path} --at seq:${view.info.targetSeq} --force\` and take a new snapshot`,
          { path: disk.device.path, offsetBytes: offset + i },
        );
      }
    }
  }
  return view.sizeBytes;
}

function bytesEqual(a: Uint8Array, b: Uint8Array, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (a[i] !== b[i]) return false;
  return true;
}
