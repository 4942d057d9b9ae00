/**
 * The control socket of a running writer (`logdir/control.sock`): one JSON request per line,
 * one JSON reply per line. It lets `sectorlog mark` add a mark while `watch` holds the lock.
 *
 * @module
 */
import { join } from "node:path";
import { concatBytes, writeAll } from "./byte_sink.ts";
import { CONTROL_SOCKET_FILE } from "./format/logdir.ts";

/** Longest request line accepted. */
export const CONTROL_REQUEST_BYTES_MAX = 4096;
/** How long a client waits for a reply. */
export const CONTROL_REPLY_MS_MAX = 10_000;

/** A request on the control socket. */
export type ControlRequest = { op: "mark"; name: string } | { op: "seal" } | { op: "status" };

/** What the writer does with requests. */
export interface ControlHandlers {
  mark(name: string): Promise<{ seq: number; timeUs: number }>;
  /**
   * Seals the live segment so that every entry so far is in a sealed segment; `nextSeq` is the
   * first seq of the new live segment.
   */
  seal(): Promise<{ nextSeq: number }>;
  status(): Record<string, unknown>;
}

/** Serves the control socket of `logdir` until {@linkcode ControlServer.close}. */
export class ControlServer {
  readonly path: string;
  #listener: Deno.Listener;
  #handlers: ControlHandlers;
  #done: Promise<void>;
  #connections = new Set<Deno.Conn>();

  private constructor(path: string, listener: Deno.Listener, handlers: ControlHandlers) {
    this.path = path;
    this.#listener = listener;
    this.#handlers = handlers;
    this.#done = this.#acceptLoop();
  }

  /** Listens on `logdir/control.sock`, replacing a stale socket file left by a crash. */
  static async listen(logdir: string, handlers: ControlHandlers): Promise<ControlServer> {
    const path = join(logdir, CONTROL_SOCKET_FILE);
    // The caller holds the logdir lock, so a socket file here is a leftover of a dead writer.
    await Deno.remove(path).catch(() => {});
    const listener = Deno.listen({ transport: "unix", path });
    return new ControlServer(path, listener, handlers);
  }

  async #acceptLoop(): Promise<void> {
    try {
      for await (const conn of this.#listener) {
        this.#connections.add(conn);
        this.#serve(conn).finally(() => this.#connections.delete(conn));
      }
    } catch {
      // The listener was closed.
    }
  }

  async #serve(conn: Deno.Conn): Promise<void> {
    try {
      const line = await readLine(conn, CONTROL_REQUEST_BYTES_MAX);
      const reply = await this.#handle(line);
      await writeAll(conn, new TextEncoder().encode(JSON.stringify(reply) + "\n"));
    } catch {
      // A client that goes away or sends garbage only loses its own connection.
    } finally {
      try {
        conn.close();
      } catch { /* already closed */ }
    }
  }

  async #handle(line: string | undefined): Promise<Record<string, unknown>> {
    let request: ControlRequest;
    try {
      request = JSON.parse(line ?? "");
    } catch {
      return { ok: false, error: "request is not JSON" };
    }
    try {
      if (request.op === "mark" && typeof request.name === "string") {
        return { ok: true, ...(await this.#handlers.mark(request.name)) };
      }
      if (request.op === "seal") return { ok: true, ...(await this.#handlers.seal()) };
      if (request.op === "status") return { ok: true, ...this.#handlers.status() };
      return { ok: false, error: "unknown request" };
    } catch (error) {
      return { ok: false, error: (error as Error).message };
    }
  }

  /** Stops listening, closes open connections and removes the socket file. */
  async close(): Promise<void> {
    this.#listener.close();
    for (const conn of this.#connections) {
      try {
        conn.close();
      } catch { /* already closed */ }
    }
    await this.#done;
    await Deno.remove(this.path).catch(() => {});
  }
}

/**
 * Asks the writer of `logdir` to add a mark. Returns undefined when no writer listens there.
 * Throws the writer's error message when it refuses.
 */
export async function requestMark(
  logdir: string,
  name: string,
): Promise<{ name: string; seq: number; timeUs: number } | undefined> {
  const reply = await request(logdir, { op: "mark", name });
  if (reply === undefined) return undefined;
  if (reply.ok !== true) throw new Error(`The running writer refused the mark: ${reply.error}`);
  return { name, seq: reply.seq as number, timeUs: reply.timeUs as number };
}

/**
 * Asks the writer of `logdir` to seal its live segment. Returns the seq the next entry will get,
 * or undefined when no writer listens there.
 */
export async function requestSeal(logdir: string): Promise<{ nextSeq: number } | undefined> {
  const reply = await request(logdir, { op: "seal" });
  if (reply === undefined) return undefined;
  if (reply.ok !== true) throw new Error(`The running writer could not seal: ${reply.error}`);
  return { nextSeq: reply.nextSeq as number };
}

/** Sends one request to the control socket of `logdir`; undefined when nobody listens. */
export async function request(
  logdir: string,
  body: ControlRequest,
): Promise<Record<string, unknown> | undefined> {
  let conn: Deno.Conn;
  try {
    conn = await Deno.connect({ transport: "unix", path: join(logdir, CONTROL_SOCKET_FILE) });
  } catch {
    return undefined;
  }
  const timer = setTimeout(() => conn.close(), CONTROL_REPLY_MS_MAX);
  try {
    await writeAll(conn, new TextEncoder().encode(JSON.stringify(body) + "\n"));
    const line = await readLine(conn, 1024 * 1024);
    if (line === undefined) throw new Error(`No reply on the control socket of ${logdir}`);
    return JSON.parse(line);
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed by the timer */ }
  }
}

async function readLine(conn: Deno.Conn, bytesMax: number): Promise<string | undefined> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  const buffer = new Uint8Array(4096);
  while (total <= bytesMax) {
    const n = await conn.read(buffer);
    if (n === null) break;
    const chunk = buffer.slice(0, n);
    const newline = chunk.indexOf(10);
    if (newline >= 0) {
      chunks.push(chunk.subarray(0, newline));
      return new TextDecoder().decode(concatBytes(chunks));
    }
    chunks.push(chunk);
    total += n;
  }
  return undefined;
}
