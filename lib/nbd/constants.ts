/**
 * Every number of the NBD protocol (fixed newstyle) that sectorlog uses, checked against
 * `doc/proto.md` of the NetworkBlockDevice/nbd project, plus number→name tables so that logs
 * print `NBD_OPT_GO` and `NBD_CMD_FLUSH` rather than `7` and `3`.
 *
 * All integers on the wire are big-endian.
 *
 * @example
 * ```ts
 * import { NBD_CMD_FLUSH, nbdCommandName } from "./constants.ts";
 * console.log(nbdCommandName(NBD_CMD_FLUSH)); // "NBD_CMD_FLUSH"
 * ```
 *
 * @module
 */

// ---- Handshake ----------------------------------------------------------------------------

/** The default TCP port of NBD. */
export const NBD_DEFAULT_PORT = 10809;
/** First u64 of the server greeting ("NBDMAGIC"). */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** Second u64 of the newstyle greeting and first u64 of every option request ("IHAVEOPT"). */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** First u64 of every option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
/** The magic of the withdrawn oldstyle handshake; sectorlog does not speak it. */
export const NBD_CLISERV_MAGIC = 0x00420281861253n;

/** Handshake flag: the server speaks fixed newstyle. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
/** Handshake flag: the server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
export const NBD_FLAG_NO_ZEROES = 1 << 1;

/** Client flag: the client speaks fixed newstyle. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
/** Client flag: the client does not want the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- Options ------------------------------------------------------------------------------

/** Option: choose an export and enter transmission (reply is not an option reply). */
export const NBD_OPT_EXPORT_NAME = 1;
/** Option: the client ends the handshake. */
export const NBD_OPT_ABORT = 2;
/** Option: list the exports. */
export const NBD_OPT_LIST = 3;
/** Option: withdrawn experimental extension. */
export const NBD_OPT_PEEK_EXPORT = 4;
/** Option: upgrade to TLS. */
export const NBD_OPT_STARTTLS = 5;
/** Option: describe an export without entering transmission. */
export const NBD_OPT_INFO = 6;
/** Option: describe an export and enter transmission. */
export const NBD_OPT_GO = 7;
/** Option: negotiate structured replies. */
export const NBD_OPT_STRUCTURED_REPLY = 8;
/** Option: list metadata contexts. */
export const NBD_OPT_LIST_META_CONTEXT = 9;
/** Option: select metadata contexts. */
export const NBD_OPT_SET_META_CONTEXT = 10;
/** Option: experimental 64-bit headers. */
export const NBD_OPT_EXTENDED_HEADERS = 11;

// ---- Option replies -----------------------------------------------------------------------

/** Option reply: success, end of the reply. */
export const NBD_REP_ACK = 1;
/** Option reply: one export of NBD_OPT_LIST. */
export const NBD_REP_SERVER = 2;
/** Option reply: one information item of NBD_OPT_INFO / NBD_OPT_GO. */
export const NBD_REP_INFO = 3;
/** Option reply: one metadata context. */
export const NBD_REP_META_CONTEXT = 4;
/** Bit 31: the option reply is an error. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
/** Option error: unknown or unsupported option. */
export const NBD_REP_ERR_UNSUP = 0x80000001;
/** Option error: forbidden by policy. */
export const NBD_REP_ERR_POLICY = 0x80000002;
/** Option error: syntactically invalid option. */
export const NBD_REP_ERR_INVALID = 0x80000003;
/** Option error: not supported on this platform. */
export const NBD_REP_ERR_PLATFORM = 0x80000004;
/** Option error: TLS required first. */
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
/** Option error: no such export. */
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
/** Option error: the server is shutting down. */
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
/** Option error: the client must ask for NBD_INFO_BLOCK_SIZE. */
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
/** Option error: the request or its reply is too large. */
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
/** Option error: extended headers required. */
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

// ---- Information items of NBD_OPT_INFO / NBD_OPT_GO ---------------------------------------

/** Info: export size (u64) and transmission flags (u16). Mandatory before NBD_REP_ACK. */
export const NBD_INFO_EXPORT = 0;
/** Info: canonical export name. */
export const NBD_INFO_NAME = 1;
/** Info: human-readable description. */
export const NBD_INFO_DESCRIPTION = 2;
/** Info: block size constraints (u32 minimum, u32 preferred, u32 maximum payload). */
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- Transmission flags (u16) -------------------------------------------------------------

/** Transmission flag: always set. */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
/** Transmission flag: the export is read-only. */
export const NBD_FLAG_READ_ONLY = 1 << 1;
/** Transmission flag: the server accepts NBD_CMD_FLUSH. */
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
/** Transmission flag: the server accepts NBD_CMD_FLAG_FUA. */
export const NBD_FLAG_SEND_FUA = 1 << 3;
/** Transmission flag: the export is rotational (a hint for the client's I/O scheduler). */
export const NBD_FLAG_ROTATIONAL = 1 << 4;
/** Transmission flag: the server accepts NBD_CMD_TRIM. */
export const NBD_FLAG_SEND_TRIM = 1 << 5;
/** Transmission flag: the server accepts NBD_CMD_WRITE_ZEROES. */
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
/** Transmission flag: the server accepts NBD_CMD_FLAG_DF. */
export const NBD_FLAG_SEND_DF = 1 << 7;
/** Transmission flag: flushes on one connection cover writes of every connection. */
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
/** Transmission flag: the server accepts NBD_CMD_RESIZE. */
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
/** Transmission flag: the server accepts NBD_CMD_CACHE. */
export const NBD_FLAG_SEND_CACHE = 1 << 10;
/** Transmission flag: the server accepts NBD_CMD_FLAG_FAST_ZERO. */
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
/** Transmission flag: block status requests carry a payload. */
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;

// ---- Requests and replies -----------------------------------------------------------------

/** First u32 of every transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** First u32 of every simple reply. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** First u32 of every structured reply chunk (not used by sectorlog). */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Bytes of a request header: magic, flags, type, handle, offset, length. */
export const NBD_REQUEST_HEADER_BYTES = 28;
/** Bytes of a simple reply header: magic, error, handle. */
export const NBD_SIMPLE_REPLY_BYTES = 16;

/** Command: read. */
export const NBD_CMD_READ = 0;
/** Command: write (the request carries `length` bytes of payload). */
export const NBD_CMD_WRITE = 1;
/** Command: disconnect (no reply). */
export const NBD_CMD_DISC = 2;
/** Command: flush. */
export const NBD_CMD_FLUSH = 3;
/** Command: trim (discard). */
export const NBD_CMD_TRIM = 4;
/** Command: cache (prefetch). */
export const NBD_CMD_CACHE = 5;
/** Command: write zeroes. */
export const NBD_CMD_WRITE_ZEROES = 6;
/** Command: block status. */
export const NBD_CMD_BLOCK_STATUS = 7;
/** Command: resize (experimental). */
export const NBD_CMD_RESIZE = 8;

/** Command flag: force unit access; valid on every command. */
export const NBD_CMD_FLAG_FUA = 1 << 0;
/** Command flag: do not punch a hole (WRITE_ZEROES). */
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
/** Command flag: do not fragment the read reply (structured replies only). */
export const NBD_CMD_FLAG_DF = 1 << 2;
/** Command flag: one extent per context (BLOCK_STATUS). */
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
/** Command flag: fail fast unless zeroing is fast (WRITE_ZEROES). */
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
/** Command flag: the length field is a payload length (extended headers). */
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// ---- Errors of the reply's error field ----------------------------------------------------

/** Error: operation not permitted. */
export const NBD_EPERM = 1;
/** Error: input/output error. */
export const NBD_EIO = 5;
/** Error: cannot allocate memory. */
export const NBD_ENOMEM = 12;
/** Error: invalid argument. */
export const NBD_EINVAL = 22;
/** Error: no space left on device. */
export const NBD_ENOSPC = 28;
/** Error: value too large. */
export const NBD_EOVERFLOW = 75;
/** Error: operation not supported. */
export const NBD_ENOTSUP = 95;
/** Error: the server is shutting down. */
export const NBD_ESHUTDOWN = 108;

// ---- Sizes --------------------------------------------------------------------------------

/** The minimum block size sectorlog advertises: any byte offset and length is accepted. */
export const NBD_BLOCK_BYTES_MIN = 1;
/** The preferred block size sectorlog advertises. */
export const NBD_BLOCK_BYTES_PREFERRED = 4096;
/** The largest READ or WRITE payload sectorlog accepts (the spec's portable limit, 32 MiB). */
export const NBD_PAYLOAD_BYTES_MAX = 32 * 1024 * 1024;
/** The longest string (export name, description) the spec allows. */
export const NBD_STRING_BYTES_MAX = 4096;

// ---- Names --------------------------------------------------------------------------------

const OPTION_NAMES: Readonly<Record<number, string>> = {
  [NBD_OPT_EXPORT_NAME]: "NBD_OPT_EXPORT_NAME",
  [NBD_OPT_ABORT]: "NBD_OPT_ABORT",
  [NBD_OPT_LIST]: "NBD_OPT_LIST",
  [NBD_OPT_PEEK_EXPORT]: "NBD_OPT_PEEK_EXPORT",
  [NBD_OPT_STARTTLS]: "NBD_OPT_STARTTLS",
  [NBD_OPT_INFO]: "NBD_OPT_INFO",
  [NBD_OPT_GO]: "NBD_OPT_GO",
  [NBD_OPT_STRUCTURED_REPLY]: "NBD_OPT_STRUCTURED_REPLY",
  [NBD_OPT_LIST_META_CONTEXT]: "NBD_OPT_LIST_META_CONTEXT",
  [NBD_OPT_SET_META_CONTEXT]: "NBD_OPT_SET_META_CONTEXT",
  [NBD_OPT_EXTENDED_HEADERS]: "NBD_OPT_EXTENDED_HEADERS",
};

const REPLY_NAMES: Readonly<Record<number, string>> = {
  [NBD_REP_ACK]: "NBD_REP_ACK",
  [NBD_REP_SERVER]: "NBD_REP_SERVER",
  [NBD_REP_INFO]: "NBD_REP_INFO",
  [NBD_REP_META_CONTEXT]: "NBD_REP_META_CONTEXT",
  [NBD_REP_ERR_UNSUP]: "NBD_REP_ERR_UNSUP",
  [NBD_REP_ERR_POLICY]: "NBD_REP_ERR_POLICY",
  [NBD_REP_ERR_INVALID]: "NBD_REP_ERR_INVALID",
  [NBD_REP_ERR_PLATFORM]: "NBD_REP_ERR_PLATFORM",
  [NBD_REP_ERR_TLS_REQD]: "NBD_REP_ERR_TLS_REQD",
  [NBD_REP_ERR_UNKNOWN]: "NBD_REP_ERR_UNKNOWN",
  [NBD_REP_ERR_SHUTDOWN]: "NBD_REP_ERR_SHUTDOWN",
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: "NBD_REP_ERR_BLOCK_SIZE_REQD",
  [NBD_REP_ERR_TOO_BIG]: "NBD_REP_ERR_TOO_BIG",
  [NBD_REP_ERR_EXT_HEADER_REQD]: "NBD_REP_ERR_EXT_HEADER_REQD",
};

const INFO_NAMES: Readonly<Record<number, string>> = {
  [NBD_INFO_EXPORT]: "NBD_INFO_EXPORT",
  [NBD_INFO_NAME]: "NBD_INFO_NAME",
  [NBD_INFO_DESCRIPTION]: "NBD_INFO_DESCRIPTION",
  [NBD_INFO_BLOCK_SIZE]: "NBD_INFO_BLOCK_SIZE",
};

const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: "NBD_CMD_READ",
  [NBD_CMD_WRITE]: "NBD_CMD_WRITE",
  [NBD_CMD_DISC]: "NBD_CMD_DISC",
  [NBD_CMD_FLUSH]: "NBD_CMD_FLUSH",
  [NBD_CMD_TRIM]: "NBD_CMD_TRIM",
  [NBD_CMD_CACHE]: "NBD_CMD_CACHE",
  [NBD_CMD_WRITE_ZEROES]: "NBD_CMD_WRITE_ZEROES",
  [NBD_CMD_BLOCK_STATUS]: "NBD_CMD_BLOCK_STATUS",
  [NBD_CMD_RESIZE]: "NBD_CMD_RESIZE",
};

const ERROR_NAMES: Readonly<Record<number, string>> = {
  0: "OK",
  [NBD_EPERM]: "NBD_EPERM",
  [NBD_EIO]: "NBD_EIO",
  [NBD_ENOMEM]: "NBD_ENOMEM",
  [NBD_EINVAL]: "NBD_EINVAL",
  [NBD_ENOSPC]: "NBD_ENOSPC",
  [NBD_EOVERFLOW]: "NBD_EOVERFLOW",
  [NBD_ENOTSUP]: "NBD_ENOTSUP",
  [NBD_ESHUTDOWN]: "NBD_ESHUTDOWN",
};

function nameOr(table: Readonly<Record<number, string>>, value: number, prefix: string): string {
  return table[value] ?? `${prefix}(${value})`;
}

/** The name of an option number, e.g. `NBD_OPT_GO`; unknown numbers print as `NBD_OPT_?(42)`. */
export function nbdOptionName(option: number): string {
  return nameOr(OPTION_NAMES, option, "NBD_OPT_?");
}

/** The name of an option reply type, e.g. `NBD_REP_ERR_UNSUP`. */
export function nbdReplyName(replyType: number): string {
  return nameOr(REPLY_NAMES, replyType, "NBD_REP_?");
}

/** The name of an information item type, e.g. `NBD_INFO_BLOCK_SIZE`. */
export function nbdInfoName(infoType: number): string {
  return nameOr(INFO_NAMES, infoType, "NBD_INFO_?");
}

/** The name of a command type, e.g. `NBD_CMD_FLUSH`. */
export function nbdCommandName(command: number): string {
  return nameOr(COMMAND_NAMES, command, "NBD_CMD_?");
}

/** The name of a reply error value, e.g. `NBD_EINVAL`; 0 prints as `OK`. */
export function nbdErrorName(error: number): string {
  return nameOr(ERROR_NAMES, error, "NBD_E?");
}
