/**
 * The log-assisted disk (LAD): every write goes to the journal first and then to the device,
 * stamped with the time. `watch` is an NBD front for it; tests drive it directly.
 *
 * @module
 */
import { assert } from "./_assert.ts";
import { Device } from "./device.ts";
import { UsageError } from "./errors.ts";
import { type EntryHeader, MARK_NAME_BYTES_MAX } from "./format/entry.ts";
import { readLogEntries, readManifest } from "./format/logdir.ts";
import { LogdirWriter } from "./format/logdir_writer.ts";
import { GroupSync } from "./group_sync.ts";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "./nbd/backend.ts";

/** Options of {@linkcode LogAssistedDisk.open}. */
export interface DiskOpenOptions {
  /** Serve reads only; nothing is journaled and the logdir is not locked. */
  readOnly?: boolean;
  /** The lock purpose, named when another process finds the logdir busy (default "watch"). */
  purpose?: string;
  /** Wall clock in µs (tests inject one). */
  clock?: () => number;
  /** Seal segments at this size (tests use small ones). */
  segmentBytesMax?: number;
}

/** What opening the disk found and did. */
export interface DiskRecovery {
  /** Bytes of torn journal tail that were truncated. */
  tornBytes: number;
  /** Entries after the last flush re-applied to the device (write-ahead recovery). */
  replayedEntries: number;
}

/** Counters of a running disk. */
export interface DiskStats {
  writes: number;
  zeroes: number;
  trims: number;
  flushes: number;
  marks: number;
  bytesWritten: number;
}

/** Mark names are printable text. */
// deno-lint-ignore no-control-regex -- control characters are exactly what mark names must not hold
const MARK_NAME_PATTERN = /^[^\x00-\x1f\x7f]+$/;

/**
 * A device whose every write is also journaled to a logdir, write-ahead: an entry reaches the
 * journal before its data reaches the device, and a flush makes both durable.
 */
export class LogAssistedDisk implements BlockBackend {
  readonly device: Device;
  readonly recovery: DiskRecovery;
  readonly stats: DiskStats = {
    writes: 0,
    zeroes: 0,
    trims: 0,
    flushes: 0,
    marks: 0,
    bytesWritten: 0,
  };
  #writer: LogdirWriter | undefined;
  #flushGroup: GroupSync;
  #dirtySinceFlush = false;

  private constructor(device: Device, writer: LogdirWriter | undefined, recovery: DiskRecovery) {
    this.device = device;
    this.#writer = writer;
    this.recovery = recovery;
    this.#flushGroup = new GroupSync(() => this.#flushOnce());
  }

  /**
   * Opens `devicePath` behind the logdir at `logdir`. Refuses a logdir without a base snapshot or
   * made for a device of another size. After a crash it truncates the torn journal tail and
   * re-applies the entries since the last flush to the device.
   *
   * @example
   * ```ts
   * import { LogAssistedDisk } from "./disk.ts";
   * const disk = await LogAssistedDisk.open("/dev/loop3", "/var/lib/sectorlog/vm1");
   * await disk.write(4096, new Uint8Array(4096).fill(1));
   * await disk.flush();
   * await disk.close();
   * ```
   */
  static async open(
    devicePath: string,
    logdir: string,
    options: DiskOpenOptions = {},
  ): Promise<LogAssistedDisk> {
    const manifest = await readManifest(logdir);
    const device = await Device.open(devicePath, { readOnly: options.readOnly });
    try {
      if (device.sizeBytes !== manifest.deviceBytes) {
        throw new UsageError(
          `Cannot use device ${devicePath} with logdir ${logdir}: the device is ${device.sizeBytes} bytes, the logdir was made for ${manifest.deviceBytes} bytes`,
          { hint: "use the device the snapshot was taken of, or take a new snapshot" },
        );
      }
      if (options.readOnly === true) {
        return new LogAssistedDisk(device, undefined, { tornBytes: 0, replayedEntries: 0 });
      }
      const writer = await LogdirWriter.open(logdir, {
        purpose: options.purpose ?? "watch",
        beforeSeal: () => device.sync(),
        clock: options.clock,
        segmentBytesMax: options.segmentBytesMax,
        deferRecoverySeal: true,
      });
      try {
        const replayedEntries = await replayUnflushed(writer, device);
        await writer.sealRecovered();
        const disk = new LogAssistedDisk(device, writer, {
          tornBytes: writer.recovery.tornBytes,
          replayedEntries,
        });
        // Replayed writes are unflushed until the next flush entry; compaction will not seal
        // past them, so the next flush (at the latest on close) must journal one.
        disk.#dirtySinceFlush = replayedEntries > 0;
        return disk;
      } catch (error) {
        await writer.close();
        throw error;
      }
    } catch (error) {
      device.close();
      throw error;
    }
  }

  /** The device size in bytes. */
  get sizeBytes(): number {
    return this.device.sizeBytes;
  }
  /** True when opened read-only. */
  get readOnly(): boolean {
    return this.#writer === undefined;
  }
  /** A flush syncs the device and the one journal, so it covers writes of every connection. */
  get canMultiConn(): boolean {
    return true;
  }
  /** The journal writer (undefined when read-only). */
  get writer(): LogdirWriter | undefined {
    return this.#writer;
  }

  /** Reads from the device. */
  read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.device.readInto(offsetBytes, buffer);
    return Promise.resolve();
  }

  /** Journals then writes `data` at `offsetBytes`; with `fua` the reply waits for durability. */
  async write(offsetBytes: number, data: Uint8Array, options?: BackendWriteOptions): Promise<void> {
    const writer = this.#requireWriter();
    this.#assertInDevice(offsetBytes, data.length);
    while (!writer.canAppend) await writer.ready();
    writer.appendSync("write", offsetBytes, data.length, data);
    this.device.write(offsetBytes, data);
    this.#dirtySinceFlush = true;
    this.stats.writes++;
    this.stats.bytesWritten += data.length;
    if (options?.fua === true) await this.flush();
  }

  /** Journals then zeroes the range. */
  async zero(
    offsetBytes: number,
    lengthBytes: number,
    options?: BackendZeroOptions,
  ): Promise<void> {
    await this.#zeroLike("zero", offsetBytes, lengthBytes, options?.fua === true);
    this.stats.zeroes++;
  }

  /** Journals then discards the range (it reads back as zeroes). */
  async trim(
    offsetBytes: number,
    lengthBytes: number,
    options?: BackendWriteOptions,
  ): Promise<void> {
    await this.#zeroLike("trim", offsetBytes, lengthBytes, options?.fua === true);
    this.stats.trims++;
  }

  async #zeroLike(kind: "zero" | "trim", offsetBytes: number, lengthBytes: number, fua: boolean) {
    const writer = this.#requireWriter();
    this.#assertInDevice(offsetBytes, lengthBytes);
    while (!writer.canAppend) await writer.ready();
    writer.appendSync(kind, offsetBytes, lengthBytes);
    this.device.writeZeroes(offsetBytes, lengthBytes);
    this.#dirtySinceFlush = true;
    if (fua) await this.flush();
  }

  /**
   * Makes every write completed before the call durable: device fsync, then a flush entry, then
   * journal fsync. Concurrent flushes share one run (group commit).
   */
  flush(): Promise<void> {
    return this.#flushGroup.request();
  }

  async #flushOnce(): Promise<void> {
    const writer = this.#requireWriter();
    // The device is synced before the flush entry is appended, so a flush entry in the journal
    // proves that the device holds every entry before it: crash replay starts after it.
    await this.device.sync();
    if (this.#dirtySinceFlush) {
      this.#dirtySinceFlush = false;
      while (!writer.canAppend) await writer.ready();
      writer.appendSync("flush", 0, 0);
      this.stats.flushes++;
    }
    await writer.sync();
  }

  /** Appends a named point in time and makes it durable. */
  async mark(name: string): Promise<EntryHeader> {
    const payload = encodeMarkName(name);
    const writer = this.#requireWriter();
    while (!writer.canAppend) await writer.ready();
    const header = writer.appendSync("mark", 0, 0, payload);
    this.stats.marks++;
    await writer.sync();
    return header;
  }

  /** Flushes, optionally seals the live segment, releases the logdir and closes the device. */
  async close(options: { seal?: boolean } = {}): Promise<void> {
    try {
      if (this.#writer !== undefined) {
        await this.flush();
        await this.#writer.close({ seal: options.seal });
      }
    } finally {
      this.device.close();
    }
  }

  /** Checked before journaling, so an out-of-range call never leaves an entry behind. */
  #assertInDevice(offsetBytes: number, lengthBytes: number): void {
    assert(
      Number.isSafeInteger(offsetBytes) && Number.isSafeInteger(lengthBytes) && offsetBytes >= 0 &&
        lengthBytes > 0 && offsetBytes + lengthBytes <= this.device.sizeBytes,
      `range ${offsetBytes}+${lengthBytes} is outside ${this.device.path} (${this.device.sizeBytes} bytes)`,
    );
  }

  #requireWriter(): LogdirWriter {
    assert(this.#writer !== undefined, "write on a read-only log-assisted disk");
    return this.#writer;
  }
}

/** Validates a mark name and returns its UTF-8 bytes. */
export function encodeMarkName(name: string): Uint8Array {
  const bytes = new TextEncoder().encode(name);
  if (bytes.length === 0 || bytes.length > MARK_NAME_BYTES_MAX || !MARK_NAME_PATTERN.test(name)) {
    throw new UsageError(
      `Invalid mark name ${
        JSON.stringify(name)
      }: use 1 to ${MARK_NAME_BYTES_MAX} bytes of printable text`,
    );
  }
  return bytes;
}

/**
 * Re-applies the journal's entries after its last flush to the device, so that after kill -9 the
 * device equals the journal's latest state even if a write reached the journal but not the device.
 */
async function replayUnflushed(writer: LogdirWriter, device: Device): Promise<number> {
  const fromSeq = Math.max(writer.recovery.unflushedFromSeq, writer.manifest.base.replayFromSeq);
  if (fromSeq >= writer.nextSeq) return 0;
  let replayed = 0;
  for await (
    const { header, payload } of readLogEntries(writer.logdir, writer.manifest, { fromSeq })
  ) {
    if (header.kind === "write") device.write(header.offsetBytes, payload);
    else if (header.kind === "zero" || header.kind === "trim") {
      device.writeZeroes(header.offsetBytes, header.lengthBytes);
    } else continue;
    replayed++;
  }
  if (replayed > 0) await device.sync();
  return replayed;
}
