/**
 * Writing to connections and files whose `write` may take only part of a buffer, and closing
 * connections that may already be closed. Shared by the NBD server, ship/receive and the control
 * socket.
 *
 * @module
 */

/** Anything with a partial async write: a `Deno.Conn`, a `Deno.FsFile`, a TLS connection. */
export interface ByteSink {
  write(bytes: Uint8Array): Promise<number>;
}

/** Writes all of `bytes` (`write` may take only part of a buffer). */
export async function writeAll(sink: ByteSink, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) {
    written += await sink.write(written === 0 ? bytes : bytes.subarray(written));
  }
}

/** Closes a connection, ignoring the error of one already closed (by the peer or by shutdown). */
export function closeQuietly(conn: { close(): void }): void {
  try {
    conn.close();
  } catch {
    // Already closed: nothing to do.
  }
}

/** The bytes of `chunks`, one after another, in one new buffer. */
export function concatBytes(chunks: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}
