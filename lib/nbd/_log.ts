/**
 * The event type the NBD server reports through its optional logger (private to `lib/nbd/`;
 * re-exported by `server.ts`).
 *
 * @module
 */

/** Severity of an {@linkcode NbdLogEvent}. */
export type NbdLogLevel = "debug" | "info" | "warn" | "error";

/** One thing that happened in the NBD server, for the caller to print or count. */
export interface NbdLogEvent {
  /** Severity: `warn` for misbehaving clients, `error` for backend failures. */
  level: NbdLogLevel;
  /** Sentence-case description, e.g. "Closing connection: bad request magic 0xdeadbeef". */
  message: string;
  /** The connection, numbered from 1 in accept order. */
  connectionId?: number;
  /** The option or command name involved, e.g. `NBD_OPT_GO` or `NBD_CMD_WRITE`. */
  operation?: string;
  /** The error that caused the event, when there is one. */
  error?: unknown;
}

/** Receives the server's events. It must not throw. */
export type NbdLogger = (event: NbdLogEvent) => void;
