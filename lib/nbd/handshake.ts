/**
 * The fixed-newstyle NBD handshake: greeting, client flags, and a bounded option loop that ends
 * in transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or in a closed connection.
 *
 * @example
 * ```ts ignore
 * const outcome = await negotiate(conn, new SocketReader(conn), { export: info });
 * if (outcome.transmission) await new TransmissionSession(conn, reader, options).run();
 * ```
 *
 * @module
 */

import type { NbdLogger } from "./_log.ts";
import { writeAll } from "../byte_sink.ts";
import type { SocketReader } from "./_socket.ts";
import {
  NBD_BLOCK_BYTES_MIN,
  NBD_BLOCK_BYTES_PREFERRED,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_PAYLOAD_BYTES_MAX,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_SERVER,
  nbdOptionName,
} from "./constants.ts";

/** A client that has not reached transmission after this long is disconnected. */
export const HANDSHAKE_MS_MAX = 10_000;
/** Options one connection may send before it must reach transmission. */
export const OPTIONS_PER_CONNECTION_MAX = 32;
/** The largest option payload the server reads; longer options end the handshake. */
export const OPTION_DATA_BYTES_MAX = 4096;

const GREETING_BYTES = 18;
const OPTION_HEADER_BYTES = 16;
const OPTION_REPLY_HEADER_BYTES = 20;
const EXPORT_NAME_ZEROES_BYTES = 124;
const CLIENT_FLAGS_KNOWN = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
const IHAVEOPT_HIGH = Number(NBD_IHAVEOPT >> 32n);
const IHAVEOPT_LOW = Number(NBD_IHAVEOPT & 0xffffffffn);

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** What the handshake offers about the one export. */
export interface ExportInfo {
  /** The export's name; clients select it by this name ("" is qemu-nbd's default). */
  name: string;
  /** Shown by `nbdinfo` and NBD_OPT_LIST; optional. */
  description?: string;
  /** Export size in bytes. */
  sizeBytes: number;
  /** Transmission flags, from {@linkcode transmissionFlagsFor}. */
  transmissionFlags: number;
}

/** Options of {@linkcode negotiate}. */
export interface NegotiateOptions {
  /** The export the client may select. */
  export: ExportInfo;
  /** Receives protocol events. */
  logger?: NbdLogger;
  /** Names the connection in log events. */
  connectionId?: number;
}

/** How the handshake ended. */
export type NegotiateOutcome =
  | { transmission: true }
  | { transmission: false; reason: string };

/**
 * The transmission flags for a backend: flush, FUA, trim and write-zeroes always; READ_ONLY and
 * CAN_MULTI_CONN as the backend says. FAST_ZERO is not advertised, so the transmission phase
 * rejects that command flag with EINVAL.
 */
export function transmissionFlagsFor(
  backend: { readOnly: boolean; canMultiConn: boolean },
): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
    NBD_FLAG_SEND_WRITE_ZEROES;
  if (backend.readOnly) flags |= NBD_FLAG_READ_ONLY;
  if (backend.canMultiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  return flags;
}

/**
 * Runs the server side of the fixed-newstyle handshake on `conn`. Resolves `{transmission: true}`
 * when the client selected the export (the next bytes are transmission requests), otherwise with
 * the reason the caller should close the connection. Rejects on socket errors.
 */
export async function negotiate(
  conn: Deno.Conn,
  reader: SocketReader,
  options: NegotiateOptions,
): Promise<NegotiateOutcome> {
  const greeting = new Uint8Array(GREETING_BYTES);
  const greetingView = new DataView(greeting.buffer);
  greetingView.setBigUint64(0, NBD_MAGIC);
  greetingView.setBigUint64(8, NBD_IHAVEOPT);
  greetingView.setUint16(16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  await writeAll(conn, greeting);

  if (!(await reader.fill(4))) return closed("client closed the connection before its flags");
  const clientFlags = reader.view.getUint32(reader.consume(4));
  // The spec requires dropping a client that sets flags the server did not advertise.
  if ((clientFlags & ~CLIENT_FLAGS_KNOWN) !== 0) {
    return closed(`client sent unknown flags 0x${clientFlags.toString(16)}`);
  }
  const state: HandshakeState = {
    conn,
    options,
    noZeroes: (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0,
  };
  for (let count = 0; count < OPTIONS_PER_CONNECTION_MAX; count++) {
    const outcome = await negotiateOption(state, reader);
    if (outcome !== null) return outcome;
  }
  return closed(`client sent more than ${OPTIONS_PER_CONNECTION_MAX} options`);
}

interface HandshakeState {
  conn: Deno.Conn;
  options: NegotiateOptions;
  noZeroes: boolean;
}

function closed(reason: string): NegotiateOutcome {
  return { transmission: false, reason };
}

/** Reads and answers one option; returns null to keep negotiating. */
async function negotiateOption(
  state: HandshakeState,
  reader: SocketReader,
): Promise<NegotiateOutcome | null> {
  if (!(await reader.fill(OPTION_HEADER_BYTES))) {
    return closed("client closed the connection during the handshake");
  }
  const view = reader.view;
  const at = reader.consume(OPTION_HEADER_BYTES);
  if (view.getUint32(at) !== IHAVEOPT_HIGH || view.getUint32(at + 4) !== IHAVEOPT_LOW) {
    return closed("client sent an option without the IHAVEOPT magic");
  }
  const option = view.getUint32(at + 8);
  const lengthBytes = view.getUint32(at + 12);
  log(state, "debug", `Option ${nbdOptionName(option)} with ${lengthBytes} bytes`, option);
  // Refuse to read an oversized option: its bytes would cost memory, and skipping them would
  // let a client stream gigabytes at us. Nothing after it can be trusted, so end the handshake.
  if (lengthBytes > OPTION_DATA_BYTES_MAX) {
    if (option !== NBD_OPT_EXPORT_NAME) {
      await sendOptionReplies(state.conn, [
        optionReply(option, NBD_REP_ERR_TOO_BIG, encoder.encode("Option data too long")),
      ]);
    }
    return closed(`${nbdOptionName(option)} carried ${lengthBytes} bytes of data`);
  }
  if (!(await reader.fill(lengthBytes))) {
    return closed(`client closed the connection inside ${nbdOptionName(option)}`);
  }
  const dataAt = reader.consume(lengthBytes);
  const data = reader.buffer.slice(dataAt, dataAt + lengthBytes);
  return await answerOption(state, option, data);
}

async function answerOption(
  state: HandshakeState,
  option: number,
  data: Uint8Array,
): Promise<NegotiateOutcome | null> {
  const conn = state.conn;
  switch (option) {
    case NBD_OPT_EXPORT_NAME:
      return await answerExportName(state, data);
    case NBD_OPT_ABORT:
      // Older clients close without waiting for the ACK, so a failed write is not an error.
      await sendOptionReplies(conn, [optionReply(option, NBD_REP_ACK)]).catch(() => {});
      return closed("client sent NBD_OPT_ABORT");
    case NBD_OPT_LIST:
      if (data.length !== 0) {
        await sendError(conn, option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        return null;
      }
      await sendOptionReplies(conn, [
        optionReply(option, NBD_REP_SERVER, encodeServerEntry(state.options.export.name)),
        optionReply(option, NBD_REP_ACK),
      ]);
      return null;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      return await answerInfo(state, option, data);
    default:
      // STARTTLS, STRUCTURED_REPLY, the meta-context options, EXTENDED_HEADERS and anything
      // unknown: simple replies only, no TLS. Clients fall back gracefully on ERR_UNSUP.
      await sendError(conn, option, NBD_REP_ERR_UNSUP, `${nbdOptionName(option)} unsupported`);
      return null;
  }
}

async function answerExportName(
  state: HandshakeState,
  data: Uint8Array,
): Promise<NegotiateOutcome> {
  const name = decoder.decode(data);
  const info = state.options.export;
  // NBD_OPT_EXPORT_NAME cannot carry an error reply: the spec's only way to refuse is to close.
  if (name !== info.name) return closed(`client asked for unknown export ${JSON.stringify(name)}`);
  const reply = new Uint8Array(10 + (state.noZeroes ? 0 : EXPORT_NAME_ZEROES_BYTES));
  const view = new DataView(reply.buffer);
  view.setBigUint64(0, BigInt(info.sizeBytes));
  view.setUint16(8, info.transmissionFlags);
  await writeAll(state.conn, reply);
  log(state, "info", `Client selected export ${JSON.stringify(name)}`, NBD_OPT_EXPORT_NAME);
  return { transmission: true };
}

/** Answers NBD_OPT_INFO and NBD_OPT_GO, which share their request and reply formats. */
async function answerInfo(
  state: HandshakeState,
  option: number,
  data: Uint8Array,
): Promise<NegotiateOutcome | null> {
  const request = decodeInfoRequest(data);
  if (request === null) {
    await sendError(state.conn, option, NBD_REP_ERR_INVALID, "Malformed info request");
    return null;
  }
  const info = state.options.export;
  if (request.name !== info.name) {
    await sendError(
      state.conn,
      option,
      NBD_REP_ERR_UNKNOWN,
      `Unknown export ${JSON.stringify(request.name)}`,
    );
    return null;
  }
  // NBD_INFO_EXPORT is sent whether asked or not (qemu relies on it), and the block sizes too:
  // they are the spec's defaults, so a client that ignores them loses nothing.
  const replies = [
    optionReply(option, NBD_REP_INFO, encodeInfoExport(info)),
    optionReply(option, NBD_REP_INFO, encodeInfoBlockSize()),
  ];
  if (request.infoTypes.includes(NBD_INFO_NAME)) {
    replies.push(optionReply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, info.name)));
  }
  if (request.infoTypes.includes(NBD_INFO_DESCRIPTION) && info.description !== undefined) {
    replies.push(
      optionReply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, info.description)),
    );
  }
  replies.push(optionReply(option, NBD_REP_ACK));
  await sendOptionReplies(state.conn, replies);
  if (option !== NBD_OPT_GO) return null;
  log(state, "info", `Client selected export ${JSON.stringify(info.name)}`, option);
  return { transmission: true };
}

/** Decodes `u32 name length, name, u16 count, count × u16`; null when the lengths disagree. */
function decodeInfoRequest(data: Uint8Array): { name: string; infoTypes: number[] } | null {
  if (data.length < 6) return null;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const nameBytes = view.getUint32(0);
  if (nameBytes > data.length - 6) return null;
  const count = view.getUint16(4 + nameBytes);
  if (data.length !== 6 + nameBytes + 2 * count) return null;
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(view.getUint16(6 + nameBytes + 2 * i));
  return { name: decoder.decode(data.subarray(4, 4 + nameBytes)), infoTypes };
}

function encodeInfoExport(info: ExportInfo): Uint8Array {
  const body = new Uint8Array(12);
  const view = new DataView(body.buffer);
  view.setUint16(0, NBD_INFO_EXPORT);
  view.setBigUint64(2, BigInt(info.sizeBytes));
  view.setUint16(10, info.transmissionFlags);
  return body;
}

/**
 * Minimum block 1 (not 512): the backends are byte-addressed, so any offset works, and an export
 * whose size is not a multiple of 512 stays fully reachable. qemu, nbdcopy and fio all accept it
 * and still send 512-aligned I/O of their own accord.
 */
function encodeInfoBlockSize(): Uint8Array {
  const body = new Uint8Array(14);
  const view = new DataView(body.buffer);
  view.setUint16(0, NBD_INFO_BLOCK_SIZE);
  view.setUint32(2, NBD_BLOCK_BYTES_MIN);
  view.setUint32(6, NBD_BLOCK_BYTES_PREFERRED);
  view.setUint32(10, NBD_PAYLOAD_BYTES_MAX);
  return body;
}

function encodeInfoString(infoType: number, text: string): Uint8Array {
  const encoded = encoder.encode(text);
  const body = new Uint8Array(2 + encoded.length);
  new DataView(body.buffer).setUint16(0, infoType);
  body.set(encoded, 2);
  return body;
}

function encodeServerEntry(name: string): Uint8Array {
  const encoded = encoder.encode(name);
  const body = new Uint8Array(4 + encoded.length);
  new DataView(body.buffer).setUint32(0, encoded.length);
  body.set(encoded, 4);
  return body;
}

function optionReply(option: number, replyType: number, data?: Uint8Array): Uint8Array {
  const length = data?.length ?? 0;
  const reply = new Uint8Array(OPTION_REPLY_HEADER_BYTES + length);
  const view = new DataView(reply.buffer);
  view.setBigUint64(0, NBD_REP_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, replyType);
  view.setUint32(16, length);
  if (data) reply.set(data, OPTION_REPLY_HEADER_BYTES);
  return reply;
}

function sendError(
  conn: Deno.Conn,
  option: number,
  replyType: number,
  message: string,
): Promise<void> {
  return sendOptionReplies(conn, [optionReply(option, replyType, encoder.encode(message))]);
}

/** Sends several option replies with one write. */
async function sendOptionReplies(conn: Deno.Conn, replies: Uint8Array[]): Promise<void> {
  let total = 0;
  for (const reply of replies) total += reply.length;
  const joined = new Uint8Array(total);
  let at = 0;
  for (const reply of replies) {
    joined.set(reply, at);
    at += reply.length;
  }
  await writeAll(conn, joined);
}

function log(
  state: HandshakeState,
  level: "debug" | "info",
  message: string,
  option: number,
): void {
  state.options.logger?.({
    level,
    message,
    connectionId: state.options.connectionId,
    operation: nbdOptionName(option),
  });
}
