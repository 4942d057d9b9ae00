/**
 * An NBD server (fixed newstyle, simple replies) that serves one export from a
 * {@linkcode BlockBackend} over a unix socket or TCP. `sectorlog watch` puts the log-assisted
 * disk behind it; `sectorlog serve` a read-only view of the past.
 *
 * @example
 * ```ts ignore
 * import { MemoryBackend } from "./memory_backend.ts";
 * import { NbdServer } from "./server.ts";
 *
 * const server = new NbdServer({
 *   backend: new MemoryBackend({ sizeBytes: 64 * 1024 * 1024 }),
 *   listen: { path: "/tmp/disk.sock" },
 *   logger: (event) => console.error(event.level, event.message),
 * });
 * // qemu-io -f raw 'nbd+unix:///?socket=/tmp/disk.sock' -c 'write -P 0xab 0 64k'
 * Deno.addSignalListener("SIGTERM", () => server.close());
 * await server.finished;
 * ```
 *
 * @module
 */

import type { NbdLogger, NbdLogLevel } from "./_log.ts";
import { closeQuietly } from "../byte_sink.ts";
import { SocketReader } from "./_socket.ts";
import type { BlockBackend } from "./backend.ts";
import { HANDSHAKE_MS_MAX, negotiate, transmissionFlagsFor } from "./handshake.ts";
import { TransmissionSession } from "./transmission.ts";

export type { NbdLogEvent, NbdLogger, NbdLogLevel } from "./_log.ts";

/** Connections served at once; further ones are closed on accept. */
export const CONNECTIONS_MAX = 16;

/** Where the server listens: a unix socket path, or a TCP address. */
export type NbdListenOptions =
  | { path: string }
  | { hostname?: string; port: number };

/** Options of {@linkcode NbdServer}. */
export interface NbdServerOptions {
  /** The disk every connection reads and writes. */
  backend: BlockBackend;
  /** A unix socket path, or a TCP hostname (default 127.0.0.1) and port (0 picks one). */
  listen: NbdListenOptions;
  /** The one export's name. Default "" (the default export, as with qemu-nbd). */
  exportName?: string;
  /** A description shown by clients such as `nbdinfo`. */
  description?: string;
  /** Receives connection, protocol and backend events. */
  logger?: NbdLogger;
  /** Connections served at once. Default {@linkcode CONNECTIONS_MAX}. */
  connectionsMax?: number;
  /** Time a client has to finish the handshake. Default {@linkcode HANDSHAKE_MS_MAX}. */
  handshakeMsMax?: number;
}

interface Connection {
  readonly id: number;
  readonly conn: Deno.Conn;
  session: TransmissionSession | null;
  closed: boolean;
  done: Promise<void>;
}

/** Serves one export over NBD until {@linkcode NbdServer.close}. */
export class NbdServer {
  #options: NbdServerOptions;
  #listener: Deno.Listener;
  #connections = new Set<Connection>();
  #nextConnectionId = 1;
  #acceptLoop: Promise<void>;
  #closing: Promise<void> | null = null;

  /** Starts listening at once; throws when the address is taken or the path exists. */
  constructor(options: NbdServerOptions) {
    this.#options = options;
    const listen = options.listen;
    this.#listener = "path" in listen
      ? Deno.listen({ transport: "unix", path: listen.path })
      : Deno.listen({ hostname: listen.hostname ?? "127.0.0.1", port: listen.port });
    this.#acceptLoop = this.#accept();
  }

  /** The address the server listens on (read the port here after listening on port 0). */
  get addr(): Deno.Addr {
    return this.#listener.addr;
  }

  /** Connections open now (in handshake or transmission). */
  get connectionCount(): number {
    return this.#connections.size;
  }

  /** Resolves once {@linkcode NbdServer.close} has finished (or the listener failed). */
  get finished(): Promise<void> {
    return this.#acceptLoop.then(() => this.#closing ?? undefined);
  }

  /**
   * Stops accepting, lets requests in flight finish and their replies go out (later requests get
   * NBD_ESHUTDOWN), closes every connection, and removes the unix socket file. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  /** Same as {@linkcode NbdServer.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #close(): Promise<void> {
    this.#log("info", "Server closing");
    try {
      this.#listener.close();
    } catch {
      // The listener already failed; the accept loop has ended on its own.
    }
    await this.#acceptLoop;
    const closing = [...this.#connections].map((connection) => this.#closeConnection(connection));
    await Promise.all(closing);
    if ("path" in this.#options.listen) {
      await Deno.remove(this.#options.listen.path).catch(() => {});
    }
    this.#log("info", "Server closed");
  }

  async #closeConnection(connection: Connection): Promise<void> {
    // A connection still in its handshake has nothing in flight: close it outright.
    if (connection.session !== null) await connection.session.shutdown();
    this.#closeConn(connection);
    await connection.done;
  }

  async #accept(): Promise<void> {
    const connectionsMax = this.#options.connectionsMax ?? CONNECTIONS_MAX;
    while (true) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing === null) this.#log("error", "Accept failed; not listening", 0, error);
        return;
      }
      const id = this.#nextConnectionId++;
      if (this.#closing !== null || this.#connections.size >= connectionsMax) {
        this.#log("warn", `Refusing connection: ${connectionsMax} connections open`, id);
        closeQuietly(conn);
        continue;
      }
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      const connection: Connection = { id, conn, session: null, closed: false, done: null! };
      this.#connections.add(connection);
      connection.done = this.#serve(connection);
    }
  }

  async #serve(connection: Connection): Promise<void> {
    const { backend, logger } = this.#options;
    const conn = connection.conn;
    const reader = new SocketReader(conn);
    this.#log("info", "Connection accepted", connection.id);
    // A client that stays silent would otherwise hold one of the few connection slots forever.
    const timer = setTimeout(() => {
      this.#log("warn", "Closing connection: handshake took too long", connection.id);
      this.#closeConn(connection);
    }, this.#options.handshakeMsMax ?? HANDSHAKE_MS_MAX);
    try {
      const outcome = await negotiate(conn, reader, {
        export: {
          name: this.#options.exportName ?? "",
          description: this.#options.description,
          sizeBytes: backend.sizeBytes,
          transmissionFlags: transmissionFlagsFor(backend),
        },
        logger,
        connectionId: connection.id,
      });
      clearTimeout(timer);
      if (!outcome.transmission) {
        this.#log("info", `Handshake ended: ${outcome.reason}`, connection.id);
      } else if (!connection.closed) {
        connection.session = new TransmissionSession(conn, reader, {
          backend,
          logger,
          connectionId: connection.id,
        });
        await connection.session.run();
      }
    } catch (error) {
      if (!connection.closed) this.#log("info", "Connection failed", connection.id, error);
    } finally {
      clearTimeout(timer);
      this.#closeConn(connection);
      this.#connections.delete(connection);
      this.#log("info", "Connection closed", connection.id);
    }
  }

  #closeConn(connection: Connection): void {
    if (connection.closed) return;
    connection.closed = true;
    closeQuietly(connection.conn);
  }

  #log(level: NbdLogLevel, message: string, connectionId?: number, error?: unknown): void {
    this.#options.logger?.({ level, message, connectionId, error });
  }
}
