/**
 * The JSON bodies of control frames and their validation (private to `lib/ship/`). Every body
 * from the network is checked field by field before use; a bad one is a ProtocolError.
 *
 * @module
 */
import type { BaseInfo, CompactedMark, LevelInfo } from "../format/manifest.ts";
import { type Frame, frameTypeName, ProtocolError } from "./wire.ts";

/** The protocol name both hellos carry. */
export const PROTOCOL_NAME = "sectorlog-ship";

/** A host id: a letter or digit, then up to 63 letters, digits, dots, dashes, underscores. */
export const HOST_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** A file name a sender may ask the receiver to create inside a host directory. */
const SAFE_FILE_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Why `hostId` is not a valid host id, or undefined when it is. */
export function hostIdProblem(hostId: string): string | undefined {
  if (!HOST_ID_PATTERN.test(hostId)) {
    return "a host id is 1 to 64 letters, digits, '.', '-' or '_', starting with a letter or digit";
  }
  if (hostId.includes("..")) return "a host id may not contain '..'";
  return undefined;
}

/** SERVER_HELLO: the receiver speaks first. */
export interface ServerHello {
  protocol: typeof PROTOCOL_NAME;
  version: number;
  /** The receiver's nonce, hex. */
  nonce: string;
  authRequired: boolean;
}

/** CLIENT_HELLO: who the sender is and what it ships. */
export interface ClientHello {
  protocol: typeof PROTOCOL_NAME;
  version: number;
  entryFormatVersion: number;
  manifestFormatVersion: number;
  hostId: string;
  logdirId: string;
  deviceBytes: number;
  sectorBytes: number;
  /** The sender's nonce, hex. */
  nonce: string;
  /** HMAC proof of the key, hex, when the sender has a key. */
  proof?: string;
  /** Replace a receiver copy of a different logdir or device size. */
  force: boolean;
}

/** What the receiver holds for the host (in WELCOME). */
export interface StoreState {
  present: boolean;
  logdirId?: string;
  deviceBytes?: number;
  /** `<startedUs>-<crc32c>` of the receiver's base. */
  baseId?: string;
  /** Seq of the last entry the receiver holds (applyFromSeq - 1 when it holds none). */
  lastSeq: number;
  /** Header CRC of entry lastSeq, when the receiver holds that entry. */
  lastHeaderCrc32c?: number;
  applyFromSeq: number;
  horizonUs?: number;
}

/** WELCOME: the receiver accepted the sender. */
export interface Welcome {
  /** The receiver's HMAC proof, hex, when a key is used. */
  proof?: string;
  store: StoreState;
  /** The receiver closes connections idle for this long; the sender pings well before. */
  idleMsMax: number;
}

/** Why a sender transfers a whole state (base, levels) instead of resuming. */
export type StateReason = "new" | "compacted" | "replaced";

/** STATE_BEGIN: the manifest fields of the source that the receiver's copy takes over. */
export interface StateBegin {
  reason: StateReason;
  logdirId: string;
  createdUs: number;
  deviceBytes: number;
  sectorBytes: number;
  base: BaseInfo;
  horizonUs: number;
  levels: LevelInfo[];
  compactedMarks: CompactedMark[];
  /** False when the receiver already holds this base (same baseId) and links it. */
  baseIncluded: boolean;
}

/** The id of a base snapshot: its start time and checksum. */
export function baseId(base: Pick<BaseInfo, "startedUs" | "crc32c">): string {
  return `${base.startedUs}-${base.crc32c}`;
}

function bad(frame: Frame, problem: string): never {
  throw new ProtocolError(`Bad ${frameTypeName(frame.type)} frame: ${problem}`);
}

function isUint(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

function isInt(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value);
}

/** Checks a field of a body; throws naming the field. */
export function uintField(frame: Frame, body: Record<string, unknown>, name: string): number {
  const value = body[name];
  if (!isUint(value)) bad(frame, `${name} must be a non-negative integer`);
  return value;
}

function stringField(
  frame: Frame,
  body: Record<string, unknown>,
  name: string,
  maxLength = 256,
): string {
  const value = body[name];
  if (typeof value !== "string" || value.length > maxLength) {
    bad(frame, `${name} must be a string of at most ${maxLength} characters`);
  }
  return value;
}

/** Validates SERVER_HELLO. */
export function parseServerHello(frame: Frame, body: Record<string, unknown>): ServerHello {
  if (body.protocol !== PROTOCOL_NAME) bad(frame, `protocol is not "${PROTOCOL_NAME}"`);
  return {
    protocol: PROTOCOL_NAME,
    version: uintField(frame, body, "version"),
    nonce: stringField(frame, body, "nonce", 64),
    authRequired: body.authRequired === true,
  };
}

/** Validates CLIENT_HELLO (the host id's rules are checked by the caller, for its message). */
export function parseClientHello(frame: Frame, body: Record<string, unknown>): ClientHello {
  if (body.protocol !== PROTOCOL_NAME) bad(frame, `protocol is not "${PROTOCOL_NAME}"`);
  const proof = body.proof === undefined ? undefined : stringField(frame, body, "proof", 64);
  return {
    protocol: PROTOCOL_NAME,
    version: uintField(frame, body, "version"),
    entryFormatVersion: uintField(frame, body, "entryFormatVersion"),
    manifestFormatVersion: uintField(frame, body, "manifestFormatVersion"),
    hostId: stringField(frame, body, "hostId", 256),
    logdirId: stringField(frame, body, "logdirId", 128),
    deviceBytes: uintField(frame, body, "deviceBytes"),
    sectorBytes: uintField(frame, body, "sectorBytes"),
    nonce: stringField(frame, body, "nonce", 64),
    proof,
    force: body.force === true,
  };
}

/** Validates WELCOME. */
export function parseWelcome(frame: Frame, body: Record<string, unknown>): Welcome {
  const store = body.store as Record<string, unknown> | undefined;
  if (typeof store !== "object" || store === null) bad(frame, "store missing");
  const optionalUint = (name: string) =>
    store[name] === undefined ? undefined : uintField(frame, store, name);
  return {
    proof: body.proof === undefined ? undefined : stringField(frame, body, "proof", 64),
    idleMsMax: uintField(frame, body, "idleMsMax"),
    store: {
      present: store.present === true,
      logdirId: store.logdirId === undefined
        ? undefined
        : stringField(frame, store, "logdirId", 128),
      deviceBytes: optionalUint("deviceBytes"),
      baseId: store.baseId === undefined ? undefined : stringField(frame, store, "baseId", 64),
      lastSeq: uintField(frame, store, "lastSeq"),
      lastHeaderCrc32c: optionalUint("lastHeaderCrc32c"),
      applyFromSeq: uintField(frame, store, "applyFromSeq"),
      horizonUs: store.horizonUs === undefined || !isInt(store.horizonUs)
        ? undefined
        : store.horizonUs,
    },
  };
}

/** Validates STATE_BEGIN, including every file name it would make the receiver create. */
export function parseStateBegin(frame: Frame, body: Record<string, unknown>): StateBegin {
  const reason = body.reason;
  if (reason !== "new" && reason !== "compacted" && reason !== "replaced") {
    bad(frame, "reason must be new, compacted or replaced");
  }
  const base = body.base as Record<string, unknown> | undefined;
  if (typeof base !== "object" || base === null) bad(frame, "base missing");
  const baseFile = stringField(frame, base, "file", 128);
  if (!SAFE_FILE_PATTERN.test(baseFile)) bad(frame, `unsafe base file name ${baseFile}`);
  const levels = body.levels;
  const marks = body.compactedMarks;
  if (!Array.isArray(levels) || !Array.isArray(marks)) bad(frame, "levels or marks missing");
  if (!isInt(body.horizonUs) || !isInt(base.startedUs) || !isInt(base.endedUs)) {
    bad(frame, "times must be integers");
  }
  return {
    reason,
    logdirId: stringField(frame, body, "logdirId", 128),
    createdUs: isInt(body.createdUs) ? body.createdUs : bad(frame, "createdUs missing"),
    deviceBytes: uintField(frame, body, "deviceBytes"),
    sectorBytes: uintField(frame, body, "sectorBytes"),
    horizonUs: body.horizonUs,
    baseIncluded: body.baseIncluded === true,
    base: {
      file: baseFile,
      startedUs: base.startedUs,
      endedUs: base.endedUs,
      replayFromSeq: uintField(frame, base, "replayFromSeq"),
      crc32c: stringField(frame, base, "crc32c", 8),
      dataBytes: uintField(frame, base, "dataBytes"),
    },
    levels: levels.map((level) => parseLevel(frame, level)),
    compactedMarks: marks.map((mark) => parseMark(frame, mark)),
  };
}

function parseLevel(frame: Frame, value: unknown): LevelInfo {
  if (typeof value !== "object" || value === null) bad(frame, "a level is not an object");
  const level = value as Record<string, unknown>;
  const file = stringField(frame, level, "file", 128);
  if (!SAFE_FILE_PATTERN.test(file)) bad(frame, `unsafe level file name ${file}`);
  if (!isInt(level.cutUs)) bad(frame, "level cutUs missing");
  return {
    ...level,
    file,
    cutUs: level.cutUs,
    cutSeq: uintField(frame, level, "cutSeq"),
    sizeBytes: uintField(frame, level, "sizeBytes"),
    entries: uintField(frame, level, "entries"),
  };
}

function parseMark(frame: Frame, value: unknown): CompactedMark {
  if (typeof value !== "object" || value === null) bad(frame, "a mark is not an object");
  const mark = value as Record<string, unknown>;
  if (!isInt(mark.timeUs)) bad(frame, "mark timeUs missing");
  return {
    name: stringField(frame, mark, "name", 1024),
    seq: uintField(frame, mark, "seq"),
    timeUs: mark.timeUs,
  };
}
