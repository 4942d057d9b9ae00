/**
 * The sync record (`logdir/synced`): what the writer knows to be durable, written after the
 * fact and never trusted beyond what it says. Recovery uses it to tell a torn tail (unsynced
 * bytes a power cut may lose, keep or tear: cut them) from damage to durably written entries
 * (report it), and to know which entries the device already holds (replay only the rest).
 *
 * ```text
 *  0  u32  magic "SLSR"
 *  4  u8   version (1)
 *  5  u8   flags: bit 0 = deviceSyncedSeq is set
 *  6  u16  reserved, zero
 *  8  u64  segmentFirstSeq: the unsealed segment the next two fields speak of
 * 16  u64  journalSyncedBytes: bytes of that segment an fsync covered
 * 24  u64  journalSyncedSeq: the seq of the last entry in those bytes (0 when none)
 * 32  u64  deviceSyncedSeq: every write, zero and trim with seq ≤ it is durable on the device
 * 40  20×u8 reserved, zero
 * 60  u32  CRC32C of bytes 0..59
 * ```
 * All integers little-endian. The record is rewritten in place with one 64-byte write after each
 * journal fsync and each device fsync, without an fsync of its own: each claim was true when it
 * was written and stays true, so a record that a power cut loses or leaves stale only says less.
 * A record that does not decode is no record.
 *
 * @module
 */
import { assertUint } from "../_assert.ts";
import { crc32c } from "../checksum.ts";
import { type Storage, type StorageFile, StorageNotFound } from "../storage/storage.ts";

/** The sync record's file name inside a logdir. */
export const SYNC_RECORD_FILE = "synced";
/** Size of an encoded sync record. */
export const SYNC_RECORD_BYTES = 64;
const MAGIC = new Uint8Array([0x53, 0x4c, 0x53, 0x52]); // "SLSR"
const VERSION = 1;
const FLAG_DEVICE = 1;
const CRC_OFFSET = 60;

/** What a sync record says. */
export interface SyncRecord {
  /** First seq of the unsealed segment that {@linkcode journalSyncedBytes} counts in. */
  segmentFirstSeq: number;
  /** Bytes of that segment known durable. */
  journalSyncedBytes: number;
  /** Seq of the last entry within those bytes (0 when none). */
  journalSyncedSeq: number;
  /** Every change entry with seq ≤ this is durable on the device; undefined when unknown. */
  deviceSyncedSeq: number | undefined;
}

/** Encodes `record` into 64 bytes. */
export function encodeSyncRecord(record: SyncRecord, target: Uint8Array): void {
  assertUint(record.segmentFirstSeq, "segmentFirstSeq");
  assertUint(record.journalSyncedBytes, "journalSyncedBytes");
  assertUint(record.journalSyncedSeq, "journalSyncedSeq");
  if (record.deviceSyncedSeq !== undefined) assertUint(record.deviceSyncedSeq, "deviceSyncedSeq");
  target.fill(0, 0, SYNC_RECORD_BYTES);
  target.set(MAGIC, 0);
  const view = new DataView(target.buffer, target.byteOffset, SYNC_RECORD_BYTES);
  view.setUint8(4, VERSION);
  view.setUint8(5, record.deviceSyncedSeq === undefined ? 0 : FLAG_DEVICE);
  view.setBigUint64(8, BigInt(record.segmentFirstSeq), true);
  view.setBigUint64(16, BigInt(record.journalSyncedBytes), true);
  view.setBigUint64(24, BigInt(record.journalSyncedSeq), true);
  view.setBigUint64(32, BigInt(record.deviceSyncedSeq ?? 0), true);
  view.setUint32(CRC_OFFSET, crc32c(target.subarray(0, CRC_OFFSET)), true);
}

/** Decodes a sync record, or undefined when the bytes are not a whole, valid one. */
export function decodeSyncRecord(source: Uint8Array): SyncRecord | undefined {
  if (source.length < SYNC_RECORD_BYTES) return undefined;
  for (let i = 0; i < MAGIC.length; i++) if (source[i] !== MAGIC[i]) return undefined;
  const view = new DataView(source.buffer, source.byteOffset, SYNC_RECORD_BYTES);
  if (crc32c(source.subarray(0, CRC_OFFSET)) !== view.getUint32(CRC_OFFSET, true)) {
    return undefined;
  }
  if (view.getUint8(4) !== VERSION) return undefined;
  const flags = view.getUint8(5);
  const fields = [8, 16, 24, 32].map((at) => view.getBigUint64(at, true));
  if (fields.some((value) => value > BigInt(Number.MAX_SAFE_INTEGER))) return undefined;
  const [segmentFirstSeq, journalSyncedBytes, journalSyncedSeq, deviceSyncedSeq] = fields.map(
    Number,
  );
  return {
    segmentFirstSeq,
    journalSyncedBytes,
    journalSyncedSeq,
    deviceSyncedSeq: (flags & FLAG_DEVICE) !== 0 ? deviceSyncedSeq : undefined,
  };
}

/** Reads the sync record at `path`; undefined when there is none or it does not decode. */
export function readSyncRecord(storage: Storage, path: string): SyncRecord | undefined {
  let file: StorageFile;
  try {
    file = storage.open(path);
  } catch (error) {
    if (error instanceof StorageNotFound) return undefined;
    throw error;
  }
  try {
    const bytes = new Uint8Array(SYNC_RECORD_BYTES);
    const n = file.read(bytes, SYNC_RECORD_BYTES, 0);
    return n < SYNC_RECORD_BYTES ? undefined : decodeSyncRecord(bytes);
  } finally {
    file.close();
  }
}

/** The writer's handle on its sync record: rewrites it in place, one 64-byte write each time. */
export class SyncRecordFile {
  #file: StorageFile;
  #bytes = new Uint8Array(SYNC_RECORD_BYTES);

  private constructor(file: StorageFile) {
    this.#file = file;
  }

  /** Opens (creating) the sync record at `path`. */
  static open(storage: Storage, path: string): SyncRecordFile {
    return new SyncRecordFile(storage.open(path, { create: true }));
  }

  /** Writes `record` (to the page cache; see the module doc for why no fsync is needed). */
  write(record: SyncRecord): void {
    encodeSyncRecord(record, this.#bytes);
    this.#file.write(this.#bytes, SYNC_RECORD_BYTES, 0);
  }

  /** Makes the last record durable (at close, so the next open finds it). */
  sync(): Promise<void> {
    return this.#file.syncData();
  }

  close(): void {
    this.#file.close();
  }
}
