/**
 * A tiny NBD client for protocol tests: it speaks the handshake and transmission byte by byte over
 * `Deno.connect`, so tests can send exactly the bytes they mean, malformed ones included.
 *
 * @module
 */

import { MemoryBackend } from "../lib/nbd/memory_backend.ts";
import { NbdServer, type NbdServerOptions } from "../lib/nbd/server.ts";
import type { BlockBackend } from "../lib/nbd/backend.ts";
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_IHAVEOPT,
  NBD_INFO_EXPORT,
  NBD_OPT_GO,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
} from "../lib/nbd/constants.ts";

const encoder = new TextEncoder();

/** One option reply as received. */
export interface OptionReply {
  option: number;
  type: number;
  data: Uint8Array;
}

/** One simple reply as received. */
export interface SimpleReply {
  error: number;
  handle: bigint;
  data: Uint8Array;
}

/** Fields of one transmission request. */
export interface RequestFields {
  type: number;
  handle: bigint;
  offset?: bigint | number;
  length?: number;
  flags?: number;
  /** Sent after the header (WRITE data, or deliberately wrong bytes). */
  payload?: Uint8Array;
  /** Overrides the request magic. */
  magic?: number;
}

/** A raw NBD client over one connection. */
export class RawNbdClient {
  readonly conn: Deno.Conn;
  #pending = new Uint8Array(0);
  #closed = false;
  /** Bytes expected in the data of a successful READ reply, by handle. */
  readonly readLengths = new Map<bigint, number>();

  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  /** Connects to a unix socket. */
  static async connect(path: string): Promise<RawNbdClient> {
    return new RawNbdClient(await Deno.connect({ transport: "unix", path }));
  }

  /** Reads exactly `bytes` bytes; null if the server closed the connection first. */
  async readExact(bytes: number): Promise<Uint8Array | null> {
    while (this.#pending.length < bytes) {
      const chunk = new Uint8Array(Math.max(65536, bytes - this.#pending.length));
      let count: number | null;
      try {
        count = await this.conn.read(chunk);
      } catch (error) {
        if (error instanceof Deno.errors.ConnectionReset) return null;
        throw error;
      }
      if (count === null) return null;
      const joined = new Uint8Array(this.#pending.length + count);
      joined.set(this.#pending);
      joined.set(chunk.subarray(0, count), this.#pending.length);
      this.#pending = joined;
    }
    const result = this.#pending.slice(0, bytes);
    this.#pending = this.#pending.slice(bytes);
    return result;
  }

  /** Like {@linkcode readExact} but throws when the connection closed. */
  async mustRead(bytes: number): Promise<Uint8Array> {
    const result = await this.readExact(bytes);
    if (result === null) throw new Error(`Connection closed while expecting ${bytes} bytes`);
    return result;
  }

  /** True when the server closed the connection (after any bytes still in flight). */
  async isClosedByServer(): Promise<boolean> {
    while (true) {
      const chunk = await this.readExact(1);
      if (chunk === null) return true;
    }
  }

  /** Writes raw bytes; returns false if the server already closed the connection. */
  async send(bytes: Uint8Array): Promise<boolean> {
    try {
      let written = 0;
      while (written < bytes.length) written += await this.conn.write(bytes.subarray(written));
      return true;
    } catch (error) {
      if (error instanceof Deno.errors.BrokenPipe || error instanceof Deno.errors.ConnectionReset) {
        return false;
      }
      throw error;
    }
  }

  /** Reads the 18-byte greeting and returns its fields. */
  async readGreeting(): Promise<{ magic: bigint; option: bigint; flags: number }> {
    const bytes = await this.mustRead(18);
    const view = new DataView(bytes.buffer);
    return { magic: view.getBigUint64(0), option: view.getBigUint64(8), flags: view.getUint16(16) };
  }

  /** Sends the client flags. */
  async sendClientFlags(flags: number): Promise<void> {
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, flags);
    await this.send(bytes);
  }

  /** Reads the greeting and sends fixed-newstyle (and by default no-zeroes) flags. */
  async startHandshake(
    flags: number = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
  ): Promise<void> {
    await this.readGreeting();
    await this.sendClientFlags(flags);
  }

  /** Sends one option; `lengthOverride` lies about its length. */
  async sendOption(
    option: number,
    data: Uint8Array = new Uint8Array(0),
    lengthOverride?: number,
  ): Promise<boolean> {
    const bytes = new Uint8Array(16 + data.length);
    const view = new DataView(bytes.buffer);
    view.setBigUint64(0, NBD_IHAVEOPT);
    view.setUint32(8, option);
    view.setUint32(12, lengthOverride ?? data.length);
    bytes.set(data, 16);
    return await this.send(bytes);
  }

  /** Reads one option reply; null when the server closed the connection. */
  async readOptionReply(): Promise<OptionReply | null> {
    const header = await this.readExact(20);
    if (header === null) return null;
    const view = new DataView(header.buffer);
    if (view.getBigUint64(0) !== NBD_REP_MAGIC) throw new Error("Bad option reply magic");
    const length = view.getUint32(16);
    const data = await this.mustRead(length);
    return { option: view.getUint32(8), type: view.getUint32(12), data };
  }

  /** Reads option replies up to and including the first one that is not NBD_REP_INFO/SERVER. */
  async readOptionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    while (true) {
      const reply = await this.readOptionReply();
      if (reply === null) throw new Error("Connection closed during option replies");
      replies.push(reply);
      if (reply.type === NBD_REP_ACK || (reply.type & 0x80000000) !== 0) return replies;
    }
  }

  /** Sends NBD_OPT_GO for `name`; returns the export size and flags after NBD_REP_ACK. */
  async go(name = "", infoTypes: number[] = []): Promise<{ sizeBytes: bigint; flags: number }> {
    await this.sendOption(NBD_OPT_GO, encodeInfoRequest(name, infoTypes));
    const replies = await this.readOptionReplies();
    const last = replies[replies.length - 1];
    if (last.type !== NBD_REP_ACK) {
      throw new Error(`NBD_OPT_GO failed: 0x${last.type.toString(16)}`);
    }
    const exportInfo = replies.find((reply) =>
      reply.type === NBD_REP_INFO &&
      new DataView(reply.data.buffer).getUint16(0) === NBD_INFO_EXPORT
    );
    if (!exportInfo) throw new Error("NBD_OPT_GO replied without NBD_INFO_EXPORT");
    const view = new DataView(exportInfo.data.buffer);
    return { sizeBytes: view.getBigUint64(2), flags: view.getUint16(10) };
  }

  /** Sends one transmission request. */
  async sendRequest(fields: RequestFields): Promise<boolean> {
    return await this.send(encodeRequest(fields));
  }

  /** Sends a READ and remembers its length to parse the reply. */
  async sendRead(handle: bigint, offset: number, length: number, flags = 0): Promise<void> {
    this.readLengths.set(handle, length);
    await this.sendRequest({ type: 0, handle, offset, length, flags });
  }

  /** Reads one simple reply; READ data is read when the handle was sent with `sendRead`. */
  async readReply(): Promise<SimpleReply | null> {
    const header = await this.readExact(16);
    if (header === null) return null;
    const view = new DataView(header.buffer);
    const magic = view.getUint32(0);
    if (magic !== NBD_SIMPLE_REPLY_MAGIC) {
      throw new Error(`Bad reply magic 0x${magic.toString(16)}`);
    }
    const error = view.getUint32(4);
    const handle = view.getBigUint64(8);
    const length = error === 0 ? this.readLengths.get(handle) ?? 0 : 0;
    this.readLengths.delete(handle);
    return { error, handle, data: await this.mustRead(length) };
  }

  /** Like {@linkcode readReply} but throws when the connection closed. */
  async mustReadReply(): Promise<SimpleReply> {
    const reply = await this.readReply();
    if (reply === null) throw new Error("Connection closed while expecting a reply");
    return reply;
  }

  /** Closes the connection (idempotent). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch {
      // Already closed.
    }
  }
}

/** Encodes the data of NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequest(name: string, infoTypes: number[] = []): Uint8Array {
  const nameBytes = encoder.encode(name);
  const bytes = new Uint8Array(6 + nameBytes.length + 2 * infoTypes.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, nameBytes.length);
  bytes.set(nameBytes, 4);
  view.setUint16(4 + nameBytes.length, infoTypes.length);
  infoTypes.forEach((type, i) => view.setUint16(6 + nameBytes.length + 2 * i, type));
  return bytes;
}

/** Encodes a 28-byte request header followed by any payload. */
export function encodeRequest(fields: RequestFields): Uint8Array {
  const payload = fields.payload ?? new Uint8Array(0);
  const bytes = new Uint8Array(28 + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, fields.magic ?? NBD_REQUEST_MAGIC);
  view.setUint16(4, fields.flags ?? 0);
  view.setUint16(6, fields.type);
  view.setBigUint64(8, fields.handle);
  view.setBigUint64(16, BigInt(fields.offset ?? 0));
  view.setUint32(24, fields.length ?? payload.length);
  bytes.set(payload, 28);
  return bytes;
}

/** A buffer of `length` bytes, each `value`. */
export function pattern(length: number, value: number): Uint8Array {
  return new Uint8Array(length).fill(value);
}

/** A running server on a unix socket in a fresh temp dir, with its cleanup. */
export interface TestServer {
  server: NbdServer;
  backend: BlockBackend;
  dir: string;
  socketPath: string;
  /** The URI real clients use. */
  uri: string;
  /** Log events seen so far. */
  events: { level: string; message: string }[];
  /** Opens a raw client that has already reached transmission with NBD_OPT_GO. */
  connect(): Promise<RawNbdClient>;
  /** Closes the server and removes the temp dir. */
  close(): Promise<void>;
}

/** Starts a server over `backend` (a 1 MiB MemoryBackend by default). */
export async function startTestServer(
  options: Partial<Omit<NbdServerOptions, "listen">> = {},
): Promise<TestServer> {
  const backend = options.backend ?? new MemoryBackend({ sizeBytes: 1024 * 1024 });
  const dir = await Deno.makeTempDir({ prefix: "sectorlog_nbd_" });
  const socketPath = `${dir}/nbd.sock`;
  const events: { level: string; message: string }[] = [];
  const server = new NbdServer({
    ...options,
    backend,
    listen: { path: socketPath },
    logger: (event) => events.push({ level: event.level, message: event.message }),
  });
  return {
    server,
    backend,
    dir,
    socketPath,
    uri: `nbd+unix:///${options.exportName ?? ""}?socket=${socketPath}`,
    events,
    async connect() {
      const client = await RawNbdClient.connect(socketPath);
      await client.startHandshake();
      await client.go(options.exportName ?? "");
      return client;
    },
    async close() {
      await server.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}
