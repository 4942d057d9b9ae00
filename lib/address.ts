/**
 * `HOST:PORT` arguments (watch, serve, ship, receive).
 *
 * @module
 */
import { UsageError } from "./errors.ts";

/** A TCP address. */
export interface HostPort {
  hostname: string;
  port: number;
}

/**
 * Parses `HOST:PORT` (`[::1]:7420` for IPv6; an empty host means 127.0.0.1), naming `argument`
 * in the error.
 *
 * @example
 * ```ts
 * import { parseHostPort } from "./address.ts";
 * parseHostPort("backup.example:7420", "<host:port>"); // { hostname: "backup.example", port: 7420 }
 * ```
 */
export function parseHostPort(text: string, argument: string): HostPort {
  const match = /^(.*):(\d{1,5})$/.exec(text);
  const port = match === null ? NaN : Number(match[2]);
  if (match === null || port > 65535) {
    throw new UsageError(`Invalid ${argument} ${JSON.stringify(text)}: expected HOST:PORT`, {
      hint: "for example 127.0.0.1:7420 or [::1]:7420",
    });
  }
  return { hostname: match[1].replace(/^\[(.*)\]$/, "$1") || "127.0.0.1", port };
}
