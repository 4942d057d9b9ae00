/**
 * Unix socket paths of long-running servers (watch, serve): a server killed with kill -9 leaves
 * its socket file, and binding over it fails with "Address already in use".
 *
 * @module
 */
import { UsageError } from "./errors.ts";

/**
 * Removes a unix socket file left behind by a server that died (kill -9 leaves it, and binding
 * over it fails with "Address already in use"), as qemu-nbd does. Refuses a path that is not a
 * socket or where a server still answers.
 */
export async function removeStaleSocket(path: string): Promise<void> {
  let stat: Deno.FileInfo;
  try {
    stat = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  if (stat.isSocket !== true) {
    throw new UsageError(`Cannot listen on ${path}: it exists and is not a socket`);
  }
  try {
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionRefused)) throw error;
    await Deno.remove(path);
    return;
  }
  throw new UsageError(`Cannot listen on ${path}: another server is listening there`, {
    hint: "stop that server or choose another --socket path",
  });
}
